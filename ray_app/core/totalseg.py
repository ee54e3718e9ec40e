"""TotalSegmentator's own configuration, task table and weight locations, used as it uses them.

Everything that decides *which* model runs and *where* its weights live is read from TotalSegmentator itself
(``get_task_config``, ``TASK_ID_WEIGHTS_CONFIGS``, ``get_weights_dir``, ``download_pretrained_weights``), so a
user's weights folder works unchanged and a TotalSegmentator upgrade cannot silently diverge from us.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_app.core.errors import InvalidRoiSubset, UnsupportedTask, WeightsMissing

if TYPE_CHECKING:
    import numpy as np

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
# TotalSegmentator uses fewer overlapping tiles for its `total` models (nnunet.py, nnUNet_predict_image).
TOTAL_TILE_STEP = 0.8
ROI_CROP_TASK_ID = 298  # the 6 mm model TotalSegmentator runs first to crop for --roi_subset
ROI_CROP_SPACING = 6.0
ROI_CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
ROI_CROP_ADDON = (20, 20, 20)


def _setup_environment() -> None:
    """Point nnU-Net at TotalSegmentator's weights before nnunetv2 is imported (it reads them at import)."""
    from totalsegmentator.config import setup_nnunet

    setup_nnunet()


def disable_usage_stats() -> None:
    """Make TotalSegmentator's ``config.json`` say ``send_usage_stats: false``, atomically.

    TotalSegmentator POSTs usage statistics from its API unless this key is false; scans may be patient data and
    cluster nodes may have no egress. The file is replaced in one ``os.replace`` so parallel workers on a node
    never see a half-written file (TotalSegmentator itself rewrites it in place on every call).
    """
    from totalsegmentator.config import get_totalseg_dir

    home = get_totalseg_dir()
    path = home / "config.json"
    config: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        config = json.loads(path.read_text())
    if config.get("send_usage_stats") is False and config.get("statistics_disclaimer_shown"):
        return
    config.setdefault("totalseg_id", "totalseg_ray_app")
    config.setdefault("prediction_counter", 0)
    config.update(send_usage_stats=False, statistics_disclaimer_shown=True)
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".config.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=4)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ModelStage:
    """One nnU-Net model of a task: which dataset, trained how, at which spacing."""

    task_id: int
    trainer: str
    resample: float | None
    folds: tuple[int, ...] = (0,)

    @property
    def folder_name(self) -> str:
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

        return str(TASK_ID_WEIGHTS_CONFIGS[self.task_id]["foldername"])

    def model_dir(self, weights_dir: Path) -> Path:
        return weights_dir / self.folder_name / f"{self.trainer}__{PLANS}__{CONFIGURATION}"


@dataclass(frozen=True)
class TaskSpec:
    """What TotalSegmentator runs for ``task`` in the given mode."""

    task: str
    fast: bool
    stages: tuple[ModelStage, ...]
    label_map: dict[int, str]
    roi_subset: tuple[str, ...] | None = None

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "normal"

    @property
    def key(self) -> str:
        """Stable model key used in storage layouts and passport stores, e.g. ``total_fast``."""
        base = f"{self.task}_{self.mode}"
        if not self.roi_subset:
            return base
        digest = hashlib.sha256(",".join(sorted(self.roi_subset)).encode()).hexdigest()[:8]
        return f"{base}_roi{digest}"

    @property
    def crop_stage(self) -> ModelStage | None:
        """TotalSegmentator crops to the ROIs with its 6 mm model before running the main one."""
        if not self.roi_subset:
            return None
        return ModelStage(ROI_CROP_TASK_ID, ROI_CROP_TRAINER, ROI_CROP_SPACING)

    @property
    def all_stages(self) -> tuple[ModelStage, ...]:
        """Every model the task loads, the crop model included."""
        return self.stages + ((self.crop_stage,) if self.crop_stage else ())

    @property
    def output_labels(self) -> dict[int, str]:
        if not self.roi_subset:
            return self.label_map
        return {k: v for k, v in self.label_map.items() if v in self.roi_subset}


def task_spec(
    task: str = "total", fast: bool = True, roi_subset: list[str] | tuple[str, ...] | None = None
) -> TaskSpec:
    """Resolve a task through TotalSegmentator's own task table (``get_task_config``)."""
    from totalsegmentator.map_to_binary import (
        class_map,
        class_map_5_parts,
        map_taskid_to_partname_ct,
    )
    from totalsegmentator.python_api import get_task_config

    if task != "total":
        raise UnsupportedTask(f"task {task!r} is not supported; supported: 'total'")
    cfg = get_task_config(task, fast=fast, quiet=True)
    label_map = dict(class_map[task])
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    if roi_subset:
        unknown = sorted(set(roi_subset) - set(label_map.values()))
        if unknown:
            raise InvalidRoiSubset(f"roi_subset names unknown structures: {', '.join(unknown)}")
        if len(ids) > 1:
            # Like TotalSegmentator: run only the part models that contain a requested structure.
            wanted = {name for name in roi_subset}
            ids = [tid for tid in ids if wanted & set(class_map_5_parts[map_taskid_to_partname_ct[tid]].values())]
    stages = tuple(ModelStage(tid, cfg["trainer"], cfg["resample"], tuple(cfg["folds"])) for tid in ids)
    return TaskSpec(task, fast, stages, label_map, tuple(roi_subset) if roi_subset else None)


def part_label_lut(task_id: int, label_map: dict[int, str]) -> np.ndarray:
    """Lookup table from a part model's label ids to the task's ids (TotalSegmentator's merge of 291-295)."""
    import numpy as np
    from totalsegmentator.map_to_binary import (
        class_map_5_parts,
        map_taskid_to_partname_ct,
    )

    part_map = class_map_5_parts[map_taskid_to_partname_ct[task_id]]
    inv = {v: k for k, v in label_map.items()}
    lut = np.zeros(max(part_map) + 1, dtype=np.uint8)
    for part_id, name in part_map.items():
        lut[part_id] = inv[name]
    return lut


def weights_dir() -> Path:
    """Where TotalSegmentator looks for weights (``TOTALSEG_WEIGHTS_PATH`` or ``TOTALSEG_HOME_DIR``)."""
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def missing_weights(spec: TaskSpec) -> list[str]:
    """Model folders of ``spec`` that are not where TotalSegmentator looks: checked before a job starts, so a node
    without its weights costs seconds instead of a failed scan per actor."""
    root = weights_dir()
    return [stage.folder_name for stage in spec.all_stages if not (root / stage.folder_name).exists()]


def ensure_weights(stage: ModelStage, *, allow_download: bool = True) -> Path:
    """Return the stage's model folder, downloading it with TotalSegmentator's own function if absent.

    A failed or disallowed download becomes one ``WeightsMissing`` that says where the weights were expected and
    how to provide them. Downloads on one node are serialised by a lock outside the weights folder, because
    TotalSegmentator downloads every model through the same temporary zip file name.
    """
    from filelock import FileLock

    root = weights_dir()
    model_dir = stage.model_dir(root)
    if (root / stage.folder_name).exists():
        if not (model_dir / f"fold_{stage.folds[0]}" / "checkpoint_final.pth").is_file():
            raise WeightsMissing(
                f"{root / stage.folder_name} exists but has no {model_dir.name}/fold_{stage.folds[0]}"
                "/checkpoint_final.pth; remove the incomplete folder or copy the full weights"
            )
        return model_dir
    hint = (
        f"TotalSegmentator weights for task {stage.task_id} ({stage.folder_name}) are not in {root}. "
        "On a machine with internet run `totalseg_download_weights -t total_fast` (or `-t total` for normal mode) "
        "and copy the weights folder here, or set TOTALSEG_WEIGHTS_PATH to a folder containing "
        f"{stage.folder_name}/."
    )
    if not allow_download:
        raise WeightsMissing(hint + " Downloads are disabled (RAY_APP_DOWNLOAD_WEIGHTS=false).")
    from totalsegmentator.libs import download_pretrained_weights

    lock = Path(tempfile.gettempdir()) / f"ray_app-weights-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}.lock"
    try:
        with FileLock(str(lock)), contextlib.redirect_stdout(io.StringIO()):
            download_pretrained_weights(stage.task_id)
    except Exception as exc:  # requests/zip/OS errors all mean the same thing to the user
        raise WeightsMissing(f"{hint} The download failed: {type(exc).__name__}: {exc}") from exc
    if not model_dir.is_dir():
        raise WeightsMissing(f"{hint} The download finished but {model_dir} is missing.")
    return model_dir


@cache
def checkpoint_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ray_app", "totalsegmentator", "nnunetv2", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
