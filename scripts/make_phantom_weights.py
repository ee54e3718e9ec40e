"""Train small networks on synthetic phantoms and write them as TotalSegmentator model folders.

TotalSegmentator's real weights cannot be downloaded here. These stand-ins live in ``ray_app/phantom_weights``
in TotalSegmentator 2.18's exact layout, so the unmodified library (and our segmenter) run them end to end and
produce meaningful masks on phantoms: Dataset297 (fast, 3 mm), Dataset298 (fastest, 6 mm, used to crop for
``roi_subset``) and Dataset291-295 (normal mode, 1.5 mm parts).

Training is a plain PyTorch loop on phantoms rasterised at each model's spacing, in the array order nnU-Net
sees at inference (TotalSegmentator's canonical RAS NIfTI read by SimpleITK: the nibabel array transposed to
(z, y, x)), normalised by nnU-Net's own CTNormalization with the plans' intensity properties, with nnU-Net's
own loss (Dice + CE, deep supervision). Adam at a high learning rate with batch size 1 converges in about a
thousand steps; nnU-Net's SGD recipe needs far more. The five part models share one trunk trained with five
output heads (one per part, each with its own background), so normal mode costs one training, not five; the
parts therefore also share intensity properties, fingerprinted over all their foreground together.

The part models do not segment phantoms well yet: at 1.5 mm the 80x80x96 patch sees a fraction of the body,
and even 2400 steps of a (8..64)-feature trunk on 16 phantoms (38 min on one core) reached a held-out Dice of
only 0.27 on average for part 1 (liver 0.73, lungs about 0). Giving the parts the 3 mm model's context (a
six-stage (4..64) trunk whose full-resolution stage uses 1x1x1 kernels, patch 160x128x160, 24 phantoms) and
1000 steps (1.7 h on one core) brought heart and aorta to 0.91 but left/right and vertebra levels stayed far
below (part means 0.18, 0.23, 0.92, 0.62, 0.31): what is missing is training time, or a GPU. Normal mode is
tested for equality with vanilla on the same weights, which holds whatever they are; its accuracy is not tested.

    .venv/bin/python scripts/make_phantom_weights.py            # all models (~25 min on 2 idle cores)
    .venv/bin/python scripts/make_phantom_weights.py --only 297
    .venv/bin/python scripts/make_phantom_weights.py --eval-only --only 297 298
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ray_app.demo import made_weights as mw
from ray_app.demo.phantom import make_phantom, phantom_labels

OUT_ROOT = Path(__file__).resolve().parents[1] / "ray_app" / "demo" / "phantom_weights"
HELD_OUT_SEEDS = (900001, 900002, 900003)
UNUSED_CLASS_BIAS = -1000.0  # logit of the classes the phantom lacks: never predicted
PARTS = (291, 292, 293, 294, 295)


@dataclass(frozen=True)
class ModelCfg:
    """One training run; several task ids means one trunk with a head per dataset."""

    task_ids: tuple[int, ...]
    spec: mw.NetSpec
    steps: int
    n_train: int  # phantom patients in the training pool
    lr: float = 2e-2
    fg_oversample: float = 0.33  # share of patches centred on a voxel of a random present class, as nnU-Net


MODELS = {
    "297": ModelCfg((297,), mw.NetSpec((8, 16, 32, 48, 64), (80, 80, 96), batch_size=1), steps=1200, n_train=32),
    "298": ModelCfg((298,), mw.NetSpec((8, 16, 32, 48), (64, 48, 64), batch_size=1), steps=1200, n_train=24),
    "parts": ModelCfg(PARTS, mw.NetSpec((4, 8, 16, 32, 40), (80, 80, 96), batch_size=1), steps=800, n_train=10),
}


def phantom_classes(task_id: int) -> dict[int, int]:
    """Phantom ``total`` label id -> the dataset's own label id, for the phantom structures this dataset has."""
    by_name = {name: i for i, name in mw.dataset_classes(task_id).items()}
    return {tid: by_name[name] for tid, name in phantom_labels().items() if name in by_name}


def to_nnunet_order(arr: np.ndarray) -> np.ndarray:
    """nibabel (x, y, z) -> what nnU-Net's SimpleITKIO hands the network: (z, y, x)."""
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def make_pool(spacing_mm: float, seeds) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HU, total-id labels) of phantoms as TotalSegmentator hands them to nnU-Net: canonical RAS, (z, y, x)."""
    pool = []
    for seed in seeds:
        ct, lab = make_phantom(seed, spacing=(spacing_mm,) * 3)
        pool.append((to_nnunet_order(np.asarray(ct.dataobj)), to_nnunet_order(np.asarray(lab.dataobj))))
    return pool


@dataclass
class Head:
    """One dataset's output channels: training index -> dataset label id, and total id -> training index."""

    task_id: int
    dataset_ids: list[int]  # [0, *dataset label ids of the phantom's structures]
    lut: np.ndarray  # (256,) phantom total id -> training index

    @classmethod
    def for_task(cls, task_id: int) -> Head:
        classes = phantom_classes(task_id)
        dataset_ids = [0, *sorted(classes.values())]
        lut = np.zeros(256, dtype=np.uint8)
        for tid, did in classes.items():
            lut[tid] = dataset_ids.index(did)
        return cls(task_id, dataset_ids, lut)


class PatchSampler:
    """Random patches, some centred on a voxel of a random present class (nnU-Net's foreground oversampling)."""

    def __init__(self, images, labels, patch, fg_oversample, rng):
        self.images, self.labels, self.patch, self.rng = images, labels, np.array(patch), rng
        self.fg_oversample = fg_oversample
        self.fg_voxels = [{c: np.argwhere(lab == c)[::50] for c in np.unique(lab) if c > 0} for lab in labels]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, np.ndarray]:
        xs, ys = [], []
        for _ in range(batch_size):
            i = self.rng.integers(len(self.images))
            img, lab = self.images[i], self.labels[i]
            shape = np.array(img.shape)
            if self.rng.random() < self.fg_oversample:
                by_class = list(self.fg_voxels[i].values())
                voxels = by_class[self.rng.integers(len(by_class))]
                lo = voxels[self.rng.integers(len(voxels))] - self.patch // 2
            else:
                lo = np.array([self.rng.integers(min(0, s - p), max(0, s - p) + 1) for s, p in zip(shape, self.patch)])
            lo = np.clip(lo, np.minimum(0, shape - self.patch), np.maximum(0, shape - self.patch))
            xs.append(_crop(img, lo, self.patch, pad_value=img.min()))
            ys.append(_crop(lab, lo, self.patch, pad_value=0))
        return torch.from_numpy(np.stack(xs)[:, None]), np.stack(ys)[:, None]


def _crop(arr: np.ndarray, lo: np.ndarray, size: np.ndarray, pad_value) -> np.ndarray:
    """Crop ``size`` at ``lo``, padding where the patch leaves the image (as nnU-Net pads small images)."""
    src = tuple(slice(max(0, a), min(s, a + n)) for a, n, s in zip(lo, size, arr.shape))
    out = np.full(tuple(size), pad_value, dtype=arr.dtype)
    out[tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))] = arr[src]
    return out


def _deep_supervision_loss(n_stages: int):
    """nnU-Net's own loss: Dice + CE, deep supervision weights halving per scale, the lowest scale unused."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    weights = np.array([1 / 2**i for i in range(n_stages - 1)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def head_weights(state: dict, head: Head, offset: int, n_trained: int) -> dict:
    """One dataset's checkpoint: the shared trunk plus its head's rows, spread over all the dataset's classes.

    Classes the phantom lacks get zero weights and a very negative bias, so they never win the argmax.
    """
    n_dataset = len(mw.dataset_classes(head.task_id)) + 1
    out = {}
    for key, value in state.items():
        if not key.startswith("decoder.seg_layers."):
            out[key] = value
            continue
        assert value.shape[0] == n_trained
        rows = value[offset : offset + len(head.dataset_ids)]
        full = torch.zeros((n_dataset, *value.shape[1:]), dtype=value.dtype)
        if key.endswith(".bias"):
            full.fill_(UNUSED_CLASS_BIAS)
        full[head.dataset_ids] = rows
        out[key] = full
    return out


def train(cfg: ModelCfg, seed: int = 0) -> list[Path]:
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spacing = mw.TARGET_SPACING_MM[cfg.task_ids[0]]
    assert all(mw.TARGET_SPACING_MM[t] == spacing for t in cfg.task_ids)
    heads = [Head.for_task(t) for t in cfg.task_ids]
    offsets = np.cumsum([0] + [len(h.dataset_ids) for h in heads]).tolist()
    n_out = offsets[-1]

    pool = make_pool(spacing, [10_000 * cfg.task_ids[0] + i for i in range(cfg.n_train)])
    fg_lut = (np.stack([h.lut for h in heads]).max(axis=0) > 0).astype(np.uint8)  # this dataset's foreground
    intensity = mw.IntensityProperties.from_cases([(ct, fg_lut[lab]) for ct, lab in pool])
    median_shape = tuple(int(s) for s in np.median([ct.shape for ct, _ in pool], axis=0))
    plans = {t: mw.make_plans(t, cfg.spec, intensity, median_shape) for t in cfg.task_ids}
    images = [intensity.normalize(ct) for ct, _ in pool]
    labels = [lab for _, lab in pool]
    del pool
    t_data = time.time() - t0

    training_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, n_out)}}}
    net = mw.build_network(plans[cfg.task_ids[0]], training_json, cfg.task_ids[0], deep_supervision=True)
    loss_fn = _deep_supervision_loss(len(cfg.spec.features))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    sampler = PatchSampler(images, labels, cfg.spec.patch_size, cfg.fg_oversample, rng)
    net.train()
    running = None
    for step in range(cfg.steps):
        x, y_total = sampler.sample(cfg.spec.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = net(x)
        head_losses = []
        for head, lo, hi in zip(heads, offsets[:-1], offsets[1:]):
            y = torch.from_numpy(head.lut[y_total].astype(np.float32))
            targets = [y] + [F.interpolate(y, size=o.shape[2:], mode="nearest-exact") for o in outputs[1:]]
            head_losses.append(loss_fn([o[:, lo:hi].float() for o in outputs], targets))
        loss = sum(head_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        sched.step()
        now = np.array([h.item() for h in head_losses])
        running = now if running is None else 0.95 * running + 0.05 * now
        if step % 100 == 0 or step == cfg.steps - 1:
            per_head = " ".join(f"{v:.3f}" for v in running) if len(heads) > 1 else ""
            print(
                f"  [{'+'.join(map(str, cfg.task_ids))}] step {step:4d} loss {running.sum():.3f} {per_head} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )

    state = net.state_dict()
    folders = []
    for head, lo in zip(heads, offsets):
        weights = head_weights(state, head, lo, n_out)
        dataset_json = mw.make_dataset_json(head.task_id, cfg.n_train)
        folder = mw.write_model(OUT_ROOT, head.task_id, plans[head.task_id], dataset_json, weights)
        size = (folder / "fold_0" / "checkpoint_final.pth").stat().st_size
        print(f"[{head.task_id}] checkpoint {size / 1e6:.2f} MB", flush=True)
        folders.append(folder)
    print(
        f"[{'+'.join(map(str, cfg.task_ids))}] trained in {time.time() - t0:.0f} s "
        f"(phantoms {t_data:.0f} s, {cfg.steps} steps of batch {cfg.spec.batch_size})",
        flush=True,
    )
    return folders


def evaluate(task_id: int, seeds=HELD_OUT_SEEDS) -> dict[str, float]:
    """Per-structure Dice of the written model through real nnU-Net inference, with TotalSegmentator's settings."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.8,
        use_gaussian=True,
        use_mirroring=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(mw.model_dir(OUT_ROOT, task_id)), use_folds=(0,))
    classes = phantom_classes(task_id)
    names = phantom_labels()
    scores: dict[str, list[float]] = {names[t]: [] for t in classes}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            ct, lab = make_phantom(seed, spacing=(mw.TARGET_SPACING_MM[task_id],) * 3)
            path = os.path.join(tmp, "case_0000.nii.gz")
            nib.save(nib.as_closest_canonical(ct), path)
            data, props = SimpleITKIO().read_images([path])
            pred = predictor.predict_single_npy_array(data, props, None, None, False)
            truth = to_nnunet_order(np.asarray(nib.as_closest_canonical(lab).dataobj))
            for tid, did in classes.items():
                a, b = pred == did, truth == tid
                denom = a.sum() + b.sum()
                scores[names[tid]].append(float(2 * (a & b).sum() / denom) if denom else 1.0)
    return {name: float(np.mean(v)) for name, v in scores.items()}


def run_group(names: list[str], args: argparse.Namespace) -> None:
    """Train and report models in order, on one thread: on two shared cores, two single-threaded trainings
    beat one two-threaded training, whose every op waits for the slower core."""
    global OUT_ROOT
    OUT_ROOT = args.out
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in names:
        cfg = MODELS[name]
        if not args.eval_only:
            train(replace(cfg, steps=args.steps or cfg.steps, n_train=args.n_train or cfg.n_train))
        for task_id in (t for t in cfg.task_ids if t in args.eval):
            t = time.time()
            dice = evaluate(task_id)
            lines = [f"[{task_id}] held-out Dice on seeds {HELD_OUT_SEEDS} ({time.time() - t:.0f} s):"]
            lines += [f"    {s:24s} {d:.3f}" for s, d in sorted(dice.items(), key=lambda kv: kv[1])]
            lines += [f"    {'min':24s} {min(dice.values()):.3f}   mean {np.mean(list(dice.values())):.3f}"]
            print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="models to (re)train")
    parser.add_argument("--eval", nargs="*", type=int, default=[297, 298], help="task ids to report held-out Dice of")
    parser.add_argument("--eval-only", action="store_true", help="only report Dice of the written models")
    parser.add_argument("--steps", type=int, help="override the training steps (smoke tests)")
    parser.add_argument("--n-train", type=int, help="override the training pool size (smoke tests)")
    parser.add_argument("--out", type=Path, default=OUT_ROOT, help="weights root (default: the package's)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-threaded trainings")
    args = parser.parse_args()
    names = args.only or list(MODELS)
    if len(names) <= args.jobs:
        groups = [[n] for n in names]
    elif args.jobs >= 2:  # 297 is the long one: a process of its own, the others share the second
        groups = [[n for n in names if n == "297"], [n for n in names if n != "297"]]
    else:
        groups = [names]
    groups = [g for g in groups if g]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=ctx) as pool:
        for future in [pool.submit(run_group, g, args) for g in groups]:
            future.result()
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
