"""Checks a cluster job must pass before any node starts: each names the problem and what to change.

Run by ``ray-app cluster run`` with the operator's credentials, before the launcher is called. The job's driver
then repeats the destination checks with the credentials the job really writes with (``batch.preflight``), still
before any scan is segmented.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator

from botocore.exceptions import ClientError

from ray_app import storage
from ray_app.adapters.batch import STAGE_CPUS, BatchConfig, plan_shape, preflight, stage_cpus_per_actor
from ray_app.core.errors import PreflightError
from ray_app.core.totalseg import task_spec
from ray_app.settings import Settings
from ray_app.storage.manifest import read_manifest

DATA_POLICY_NAME = "ray-app-data"  # the inline policy jobs/setup_aws.py puts on both roles


def policy_allows(document: dict, action: str, resource: str) -> bool:
    """Whether an identity policy allows ``action`` on ``resource``: IAM's ``*``/``?`` wildcards, an explicit Deny
    wins, and an Allow with a Condition is not counted (it cannot be evaluated here)."""

    def matches(patterns, value: str) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatch.fnmatchcase(value, p) for p in patterns)

    allowed = False
    for st in document.get("Statement", []):
        if not (matches(st.get("Action", []), action) and matches(st.get("Resource", []), resource)):
            continue
        if st.get("Effect") == "Deny":
            return False
        allowed = allowed or ("Condition" not in st)
    return allowed


def check_region(cluster: dict) -> str:
    """The cluster launches in ``provider.region``; the job's table and bucket are looked up in the region resolved
    here, which the job also takes to the nodes. They must be one."""
    region, source = storage.aws_region()
    launch = cluster.get("provider", {}).get("region")
    if launch and launch != region:
        raise PreflightError(
            f"cluster.yaml launches in {launch}, but the job's table and bucket would be used in "
            f"{region} (from {source}): set AWS_REGION={launch} or change provider.region"
        )
    return f"region {region} (from {source})"


def check_resources(cluster: dict, cfg: BatchConfig) -> str:
    """Every custom resource the actors ask for must be offered by some worker type, or no node ever fits them."""
    offered = {name for t in cluster["available_node_types"].values() for name in t.get("resources", {})}
    missing = sorted(set(cfg.actor_resources or {}) - offered)
    if missing:
        raise PreflightError(
            f"--actor-resource {', '.join(missing)}: no node type in the cluster offers it "
            f"(offered: {', '.join(sorted(offered))})"
        )
    return "actor resources offered"


def _worker_sizes(cluster: dict, labels: set[str]) -> list[tuple[str, float | None, float]]:
    """(instance type, vCPUs, GPUs) of each worker type offering all ``labels``: what Ray's AWS provider fills in
    from the instance type (prices.json holds those sizes), unless the node type names them."""
    from ray_app.ops.cost import load_prices

    prices = load_prices()
    sizes = []
    for name, node_type in cluster["available_node_types"].items():
        resources = node_type.get("resources", {})
        if name == cluster.get("head_node_type") or not labels <= set(resources):
            continue
        instance = node_type.get("node_config", {}).get("InstanceType", name)
        cpus = resources.get("CPU", prices["instance_vcpus"].get(instance))
        sizes.append((instance, cpus, float(resources.get("GPU", prices["instance_gpus"].get(instance, 0)))))
    return sizes


def _room_per_node(cfg: BatchConfig, n: int) -> float:
    """CPUs ``n`` pinned actors must leave on their node for the CPU-stage tasks (at least two tasks' worth)."""
    return max(n * stage_cpus_per_actor(cfg, plan_shape(cfg, {})), STAGE_CPUS)


def complete_shape(cluster: dict, cfg: BatchConfig) -> list[str]:
    """Batch options that size and place the actors on the cluster's workers where the job's options do not. Its
    workers start from zero and its head runs no scan work, so an unpinned job would find no CPU to size itself
    by. The default is one node's worth of deploy/README.md's actors: 2-thread CPU actors reserving what leaves
    their node the CPU stages' room (1.9 CPUs on 16 vCPUs), or one 2-CPU actor per GPU. Options given are kept."""
    from ray_app.ops.cost import CPUS_PER_ACTOR

    extra: list[str] = []
    labels = set(cfg.actor_resources or {})
    if not labels:
        gpu = cfg.device == "cuda"
        offered = sorted(
            label
            for name, t in cluster["available_node_types"].items()
            if name != cluster.get("head_node_type")
            for label in [r for r in t.get("resources", {}) if r not in ("CPU", "GPU", "memory", "object_store_memory")]
            if any(g > 0 for _, _, g in _worker_sizes(cluster, {label})) == gpu
        )
        if not offered:
            return []
        labels = {offered[0]}
        extra += ["--actor-resource", f"{offered[0]}=1"]
    sizes = [(c, g) for _, c, g in _worker_sizes(cluster, labels) if c]
    if not sizes:
        return extra
    cpus, gpus = min(c for c, _ in sizes), min(g for _, g in sizes)  # a shape every such type fits
    g = cfg.gpus_per_actor or 0.0  # BatchConfig's own default: one GPU per actor on cuda
    threads = min(CPUS_PER_ACTOR, max(1, math.floor(cpus)))
    per_node = max(1, math.floor(gpus / g) if g else math.floor(cpus / (cfg.cpus_per_actor or threads)))
    pools = 2 if cfg.roi_subset else 1
    n_max = cfg.max_actors or max(1, per_node // pools)
    if cfg.cpus_per_actor is None:
        pinned = BatchConfig(**{**vars(cfg), "actor_resources": dict.fromkeys(labels, 1.0), "max_actors": n_max})
        fit = math.floor(round((cpus - _room_per_node(pinned, min(per_node, pools * n_max))) / per_node, 6) * 10) / 10
        extra += ["--cpus-per-actor", f"{min(threads, fit):g}"]
    if cfg.max_actors is None:
        extra += ["--max-actors", str(n_max)]
    return extra


def check_shape(cluster: dict, cfg: BatchConfig) -> str:
    """Pinned actors (``--actor-resource``) against each node type that offers their label: at least one must fit a
    node, and the actors that fit must leave the CPU-stage tasks their CPUs there. Whole-CPU actors fill a node
    whose vCPUs they divide (``--cpus-per-actor 2``: 8 on 16 vCPUs, none left), and the fetch and write tasks then
    wait for a node of their own, or forever once the cluster is at its size."""
    if not cfg.actor_resources:
        return "actor shape follows the nodes the job finds"
    shape = plan_shape(cfg, {})
    a, g = shape.cpus_per_actor, shape.gpus_per_actor
    fits = []
    for instance, cpus, gpus in _worker_sizes(cluster, set(cfg.actor_resources)):
        if cpus is None:
            return f"actor shape not checked: the vCPUs of {instance} are unknown (add them to prices.json)"
        fit = math.floor(cpus / a + 1e-9)
        if g:
            fit = min(fit, math.floor(gpus / g + 1e-9))
        if fit < 1:
            continue
        n = min(fit, (2 if cfg.roi_subset else 1) * shape.max_actors)  # no more than the job starts
        need = _room_per_node(cfg, n)
        left = cpus - n * a
        if left + 1e-9 < need:
            step = 10 if a >= 1 else 100  # a size a user would type: down to a tenth of a CPU
            better = math.floor(round((cpus - need) / n, 6) * step) / step
            raise PreflightError(
                f"--cpus-per-actor {a:g}: {n} actor(s) fill a node of type {instance} ({cpus:g} vCPUs) and leave "
                f"{max(left, 0):.2g} of the {need:.2g} CPUs the CPU-stage tasks need there (fetch, prepare, finish, "
                f"write): they would wait for nodes of their own, or forever once the cluster is at its size. "
                f"Use --cpus-per-actor {better:g} (the same {n} per node)"
            )
        fits.append(f"{n} per {instance} with {left:.2g} CPUs for the CPU stages")
    if not fits:
        raise PreflightError(
            f"an actor of {a:g} CPUs{f' and {g:g} GPUs' if g else ''} fits no node type offering "
            f"{', '.join(sorted(cfg.actor_resources))}: the job would wait forever"
        )
    return "actors " + "; ".join(fits)


def check_worker_role(role: str, cfg: BatchConfig) -> str:
    """The workers' role may write under the job's output: ``jobs/setup_aws.py --output`` bakes one prefix into its
    policy, and a job with another ``--output`` would segment every scan and then fail every write."""
    if not storage.is_s3(cfg.output):
        raise PreflightError(f"--output {cfg.output} is not on S3: cluster nodes cannot write to this machine")
    record = storage.parse_uri(cfg.job_uri("job.json"))  # the first object the job writes
    probe = f"arn:aws:s3:::{record.bucket}/{record.key}"
    try:
        doc = storage.client("iam").get_role_policy(RoleName=role, PolicyName=DATA_POLICY_NAME)["PolicyDocument"]
    except ClientError as exc:
        raise PreflightError(
            f"cannot read the policy {DATA_POLICY_NAME} of role {role}: "
            f"{exc.response['Error']['Code']} (made by jobs/setup_aws.py --iam)"
        ) from exc
    if not policy_allows(doc, "s3:PutObject", probe):
        raise PreflightError(
            f"role {role} may not write under {cfg.output}: re-run jobs/setup_aws.py --iam with "
            "this --output, or use the output prefix it was set up for"
        )
    return f"role {role} may write under {cfg.output}"


PLACEHOLDER_ACCOUNT = "123456789012"


def check_image(cluster: dict) -> str:
    """cluster.yaml ships with a placeholder registry; nodes would fail to pull it after the head had started."""
    images = [cluster.get("docker", {}).get("image", "")] + [
        t["docker"]["worker_image"]
        for t in cluster["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    if any(PLACEHOLDER_ACCOUNT in image for image in images):
        raise PreflightError(
            "cluster.yaml still names the placeholder image registry "
            f"{PLACEHOLDER_ACCOUNT}.dkr.ecr...: build and push the image (Dockerfile) and put your "
            "account and region there (deploy/README.md, step 2)"
        )
    return "node images set"


def run(cluster: dict, cfg: BatchConfig, settings: Settings, *, worker_role: str | None) -> Iterator[str]:
    """All checks in order of cost, each yielding what it found as it passes; the first that fails raises
    :class:`PreflightError`. ``worker_role`` None: a local rehearsal (no region, role or image to check)."""
    if worker_role:
        yield check_region(cluster)
        from ray_app.ops.cloudwatch import check_cluster_files

        yield check_cluster_files(cluster)
    yield check_resources(cluster, cfg)
    if worker_role:  # a local rehearsal's nodes are one-CPU stand-ins, its head takes the CPU stages
        yield check_shape(cluster, cfg)
    manifest = read_manifest(cfg.manifest)
    yield f"manifest: {len(manifest.rows)} runnable rows, {len(manifest.problems)} rejected"
    spec = task_spec("total", fast=cfg.fast, roi_subset=cfg.roi_subset)
    preflight(cfg, spec, settings, weights=False)
    yield f"passport store {cfg.passport_store_uri} answers; {cfg.output} takes a write"
    if worker_role:
        yield check_worker_role(worker_role, cfg)
        yield check_image(cluster)
