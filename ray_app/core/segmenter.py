"""The segmentation engine: TotalSegmentator's inference path, in memory, with its models loaded once.

``Segmenter`` follows ``totalsegmentator.nnunet.nnUNet_predict_image`` step for step (canonical orientation,
TotalSegmentator's own ``change_spacing``, nnU-Net's preprocessing / sliding window / export, the part-model
merge, resampling back, undoing the orientation and the ROI crop), calling the same functions with the same
arguments. It replaces only what costs time and touches the outside world: temporary NIfTI files, the
preprocessing and export processes, and building an ``nnUNetPredictor`` (and reading its checkpoint) per call.
The masks are therefore the ones vanilla TotalSegmentator writes, voxel for voxel, for the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ray_app.core import stages, totalseg
from ray_app.core.errors import RayAppError
from ray_app.settings import Settings


@dataclass
class SegmentationResult:
    """A multilabel ``uint8`` mask on the input's own grid, and where the time went."""

    mask: nib.Nifti1Image
    timings: dict[str, float] = field(default_factory=dict)


def default_num_threads() -> int:
    """CPUs this process may use: Ray sets ``OMP_NUM_THREADS`` to an actor's ``num_cpus``; else the affinity mask.

    TotalSegmentator calls ``torch.set_num_threads(cpu_count())``, which oversubscribes a node shared by workers.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


BODY_HU = -500  # air is about -1000 HU, lung tissue about -850 (inside the body's box anyway), fat about -100
BODY_MARGIN = 8  # voxels kept around the body so the tiles still see its edge in context


def body_box(data: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels above ``BODY_HU`` plus a margin: the only region worth tiling."""
    inside = np.nonzero(data > BODY_HU)
    if not inside[0].size:
        return tuple(slice(0, n) for n in data.shape)
    return tuple(
        slice(max(0, int(i.min()) - BODY_MARGIN), min(n, int(i.max()) + 1 + BODY_MARGIN))
        for i, n in zip(inside, data.shape)
    )


class Segmenter:
    """Owns the nnU-Net model(s) of one TotalSegmentator task, loaded once, and segments any number of scans.

    Like ``nnUNetPredictor``, one object holds the whole model lifecycle: construction resolves (or downloads)
    the weights and loads every checkpoint; ``segment`` only computes. Its configuration is one :class:`Settings`
    passed in (kept as ``self.settings``); the adapters build it with :meth:`from_settings`.
    """

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        spec: totalseg.TaskSpec | None = None,
        *,
        device: str | None = None,
        num_threads: int | None = None,
    ) -> Segmenter:
        """The one way the CLI, the batch actor and a Serve replica build a segmenter.

        ``spec`` (from :func:`ray_app.core.totalseg.task_spec`) says which model and ROI subset; by default the
        settings' mode on the whole body. ``device`` and ``num_threads`` override the settings' (a batch actor
        knows its CPU share; ``None`` keeps ``settings.device`` / ``settings.num_threads`` or the CPUs given).
        """
        spec = spec or totalseg.task_spec("total", fast=settings.fast)
        return cls(
            spec.task,
            fast=spec.fast,
            roi_subset=list(spec.roi_subset) if spec.roi_subset else None,
            device=device,
            num_threads=num_threads,
            settings=settings,
        )

    def __init__(
        self,
        task: str = "total",
        *,
        fast: bool | None = None,
        device: str | None = None,
        roi_subset: list[str] | None = None,
        num_threads: int | None = None,
        precision: str | None = None,
        crop_to_body: bool | None = None,
        settings: Settings,
    ):
        import torch

        self.settings = settings
        totalseg._setup_environment()
        totalseg.disable_usage_stats()
        self.spec = totalseg.task_spec(task, fast=settings.fast if fast is None else fast, roi_subset=roi_subset)
        self.device = torch.device(device or settings.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RayAppError("device 'cuda' requested but torch sees no CUDA device")
        self.num_threads = num_threads or settings.num_threads or default_num_threads()
        # Speed levers, off by default: each trades exact equality with vanilla for time (see bench/run.py).
        self.precision = precision or settings.precision
        self.crop_to_body = settings.crop_to_body if crop_to_body is None else crop_to_body
        torch.set_num_threads(1 if self.device.type == "cuda" else self.num_threads)

        self.checkpoint_loads = 0
        #: nnU-Net's ``nnUNetPredictor`` per model (nnunetv2 has no type annotations).
        self._predictors: dict[int, Any] = {}
        self._model_dirs: dict[int, Path] = {}
        for stage in self.spec.all_stages:
            model_dir = totalseg.ensure_weights(stage, allow_download=settings.download_weights)
            self._model_dirs[stage.task_id] = model_dir
            self._predictors[stage.task_id] = self._load_predictor(model_dir, stage)

    def _load_predictor(self, model_dir: Path, stage: totalseg.ModelStage) -> Any:
        # Imported here, after _setup_environment: nnunetv2 reads its paths at import, and TotalSegmentator's
        # module registers its custom trainers with nnU-Net's class lookup as a side effect.
        import totalsegmentator.nnunet  # noqa: F401
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            tile_step_size=totalseg.TOTAL_TILE_STEP,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(model_dir), use_folds=stage.folds, checkpoint_name="checkpoint_final.pth"
        )
        self.checkpoint_loads += 1
        return predictor

    @property
    def model_info(self) -> dict[str, Any]:
        """Identity of the weights and code that made a mask, for the passport."""
        datasets: list[dict[str, Any]] = []
        for stage in self.spec.all_stages:
            ckpt = self._model_dirs[stage.task_id] / f"fold_{stage.folds[0]}" / "checkpoint_final.pth"
            datasets.append(
                {
                    "task_id": stage.task_id,
                    "folder": stage.folder_name,
                    "trainer": stage.trainer,
                    "sha256": totalseg.checkpoint_sha256(ckpt),
                }
            )
        import hashlib

        combined = hashlib.sha256("".join(d["sha256"] for d in datasets).encode()).hexdigest()
        return {
            "key": self.spec.key,
            "task": self.spec.task,
            "mode": self.spec.mode,
            "roi_subset": list(self.spec.roi_subset) if self.spec.roi_subset else None,
            "datasets": datasets,
            "checksum": combined,
            "device": self.device.type,
            "precision": self.precision,
            "crop_to_body": self.crop_to_body,
            # On a CPU the forward's float sums depend on the thread count (about 2e-6 of a CT's voxels change
            # between 1 and 2 threads, bench/results/throughput-narrow-actors.json): a mask equals vanilla's made
            # with as many.
            "torch_threads": self.num_threads if self.device.type == "cpu" else None,
            "versions": totalseg.package_versions(),
        }

    def segment(self, image: nib.Nifti1Image) -> SegmentationResult:
        """Segment one 3D CT (HU) image in this process; the mask has the input's shape and affine."""
        timings: dict[str, float] = {}
        seg = stages.segment_in_process(self, image, timings)
        return SegmentationResult(self._as_mask_image(seg, image), timings)

    def infer(self, prepared: stages.Prepared) -> np.ndarray:
        """The accelerator stage: nnU-Net on one model-grid array; its ``uint8`` labels on the same grid."""
        import torch

        with torch.inference_mode():
            if len(prepared.task_ids) == 1:
                return self._run_network(prepared.task_ids[0], prepared.data, prepared.spacing)
            return self._run_parts(prepared.task_ids, prepared.data, prepared.spacing)

    @staticmethod
    def _as_mask_image(seg: np.ndarray, img_orig: nib.Nifti1Image) -> nib.Nifti1Image:
        header = img_orig.header.copy()
        header.set_data_dtype(np.uint8)
        return nib.Nifti1Image(seg.astype(np.uint8, copy=False), img_orig.affine, header)

    def _run_parts(self, task_ids: Sequence[int], data: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Normal mode: five part models merged into ``total`` ids, split in three along z for huge images."""
        shape = data.shape
        # TotalSegmentator splits images above 512*512*900 voxels (and > 200 slices) with a 20-slice margin.
        if np.prod(shape) > 512 * 512 * 900 and shape[2] > 200:
            third, margin = shape[2] // 3, 20
            parts = [
                data[:, :, : third + margin],
                data[:, :, third + 1 - margin : third * 2 + margin],
                data[:, :, third * 2 + 1 - margin :],
            ]
        else:
            parts = [data]
        merged = []
        for part in parts:
            combined = np.zeros(part.shape, dtype=np.uint8)
            for task_id in task_ids:
                seg = self._run_network(task_id, part, spacing)
                lut = totalseg.part_label_lut(task_id, self.spec.label_map)
                if seg.size and seg.max() >= len(lut):
                    lut = np.pad(lut, (0, int(seg.max()) + 1 - len(lut)))
                mapped = lut[seg]
                np.copyto(combined, mapped, where=mapped != 0)
            merged.append(combined)
        if len(merged) == 1:
            return merged[0]
        third, margin = shape[2] // 3, 20
        out = np.zeros(shape, dtype=np.uint8)
        out[:, :, :third] = merged[0][:, :, :-margin]
        out[:, :, third : third * 2] = merged[1][:, :, margin - 1 : -margin]
        out[:, :, third * 2 :] = merged[2][:, :, margin - 1 :]
        return out

    def _run_network(self, task_id: int, data: np.ndarray, spacing_xyz: Sequence[float]) -> np.ndarray:
        """nnU-Net preprocessing, sliding-window inference and export for one array in nibabel (x, y, z) order.

        nnU-Net reads TotalSegmentator's temporary NIfTI with SimpleITK, i.e. as (z, y, x) with reversed spacing;
        we hand it the same array and spacing directly and transpose the label map back.
        """
        import torch

        predictor = self._predictors[task_id]
        spacing = [float(s) for s in spacing_xyz][::-1]
        box = body_box(data) if self.crop_to_body else tuple(slice(0, n) for n in data.shape)
        arr = np.ascontiguousarray(data[box].transpose(2, 1, 0)[None], dtype=np.float32)
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16" and self.device.type == "cpu"
        )
        with autocast:
            predicted = predictor.predict_single_npy_array(arr, {"spacing": spacing}, None, None, False)
        seg: np.ndarray = np.asarray(predicted, dtype=np.uint8).transpose(2, 1, 0)
        if seg.shape == data.shape:
            return seg
        full = np.zeros(data.shape, dtype=np.uint8)
        full[box] = seg
        return full
