"""Shared fixtures. AWS is a real ``moto_server`` process on loopback: code under test (and any child
process, such as a Ray worker) talks to it over HTTP exactly as it would talk to AWS; nothing is patched."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Real CTs and TotalSegmentator's outputs for them, carried in the repository (provenance and licence in its README).
EXAMPLE_DIR = REPO / "tests" / "data" / "totalseg-example"
PHANTOM_WEIGHTS = REPO / "ray_app" / "demo" / "phantom_weights"

# Before anything can import Ray: loopback-only nodes, no token auth for local test clusters (ENVIRONMENT.md).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Before anything imports nnunetv2 (it reads its paths at import): TotalSegmentator finds the project's made
# weights exactly as it finds downloaded ones, and keeps its config.json in a throw-away home.
os.environ["TOTALSEG_WEIGHTS_PATH"] = str(PHANTOM_WEIGHTS)
os.environ["TOTALSEG_HOME_DIR"] = tempfile.mkdtemp(prefix="totalseg-home-")

from tests import guards  # noqa: E402

guards.install()  # tests may talk to loopback only

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests._ray import free_port, stop_process  # noqa: E402

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Keep a developer's own AWS profile and credentials out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "RAY_APP_AWS_ENDPOINT_URL")


def _clear_caches() -> None:
    from ray_app import storage

    storage.clear_client_cache()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """Start ``moto_server`` on 127.0.0.1:<free port>; point boto3 at it through the environment.

    Sets AWS_ENDPOINT_URL, dummy credentials, AWS_DEFAULT_REGION/AWS_REGION=us-east-1 and
    AWS_EC2_METADATA_DISABLED=true in ``os.environ`` (inherited by child processes), restores them afterwards.
    Yields the endpoint URL.
    """
    exe = Path(sys.executable).with_name("moto_server")
    exe = str(exe) if exe.exists() else shutil.which("moto_server")
    if not exe:
        pytest.fail("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto_server.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 30 s")
                time.sleep(0.1)

        saved = {k: os.environ.get(k) for k in (*_AWS_ENV, *_AWS_UNSET, "AWS_ENDPOINT_URL")}
        for k in _AWS_UNSET:
            os.environ.pop(k, None)
        os.environ.update(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
        _clear_caches()
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _clear_caches()
    finally:
        stop_process(proc, timeout=10)
        log.close()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket name on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def dynamodb_table(moto_server):
    """A fresh passport table (``ray_app.storage.sinks.create_table``) on the moto server; deleted afterwards."""
    import boto3

    from ray_app.storage.sinks import create_table

    name = f"passports-{uuid.uuid4().hex[:12]}"
    create_table(name)
    yield name
    boto3.client("dynamodb").delete_table(TableName=name)


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """Real CTs, a real DICOM series and TotalSegmentator's own outputs for them (read-only)."""
    if not (EXAMPLE_DIR / "example_ct_sm.nii.gz").is_file():
        pytest.fail(f"the example data are missing: {EXAMPLE_DIR} (part of the repository)")
    return EXAMPLE_DIR


@pytest.fixture(scope="session")
def phantom_weights() -> Path:
    """The committed, trained phantom weights in TotalSegmentator's layout; usage statistics off."""
    from ray_app.core.totalseg import disable_usage_stats

    assert (PHANTOM_WEIGHTS / "Dataset297_TotalSegmentator_total_3mm_1559subj").is_dir(), (
        "run scripts/make_phantom_weights.py"
    )
    disable_usage_stats()
    return PHANTOM_WEIGHTS


@pytest.fixture(scope="session")
def ray_cluster(moto_server, phantom_weights):
    """A local Ray started after the moto server, so its workers inherit the AWS endpoint and weights path."""
    import ray

    if ray.is_initialized():  # a job an earlier test ran in this process started its own local Ray
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
