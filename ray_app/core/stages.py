"""TotalSegmentator's per-scan path cut into stages that can run in different processes.

``prepare`` (CPU): canonical orientation and TotalSegmentator's own ``change_spacing`` to the model's spacing,
giving a small model-grid array and the little geometry needed to undo both. ``Segmenter.infer`` (the accelerator):
nnU-Net's preprocessing, sliding window and argmax only. ``finish`` (CPU): resampling back as an index gather,
undoing the orientation and the ROI crop. ``roi_subset`` adds one round, ``crop_for_roi``, between its 6 mm crop
pass and the main pass. ``segment_in_process`` chains them in one process (CLI, Serve, tests); the batch job runs
the same functions as Ray tasks and actors. Each calls TotalSegmentator's functions with its arguments, so the
masks stay the ones vanilla TotalSegmentator writes, voxel for voxel.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import nibabel as nib
import numpy as np

from ray_app.core import totalseg


@dataclass
class Prepared:
    """One model pass's input on the model's grid, and the geometry that brings its labels back to the scan."""

    #: The array nnU-Net gets, nibabel (x, y, z) order: the only thing the inference stage needs.
    data: np.ndarray
    spacing: tuple[float, float, float]
    task_ids: tuple[int, ...]
    #: Affine of the image ``prepare`` was given: its orientation is what ``finish`` restores.
    source_affine: np.ndarray
    #: The canonical image's shape before resampling; None when the model runs at the input's spacing.
    canonical_shape: tuple[int, ...] | None
    #: ``roi_subset``'s main pass: where the cropped image lies in the scan (TotalSegmentator's bbox).
    crop_bbox: list[list[int]] | None = None
    #: ``roi_subset``'s first pass, whose labels only choose the crop.
    crop_pass: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class Inferer(Protocol):
    """What ``segment_in_process`` needs of a segmenter (``ray_app.core.segmenter.Segmenter``): its task and the
    accelerator stage."""

    @property
    def spec(self) -> totalseg.TaskSpec: ...

    def infer(self, prepared: Prepared) -> np.ndarray: ...


def prepare(
    image: nib.Nifti1Image, stages: Sequence[totalseg.ModelStage], *, copy: bool = True, **extra: Any
) -> Prepared:
    """``nnUNet_predict_image``'s input side: closest canonical orientation, then ``change_spacing`` (order 1,
    int32), as TotalSegmentator calls them. ``copy``: TotalSegmentator's float64 copy of the scan's data."""
    from totalsegmentator.alignment import as_closest_canonical
    from totalsegmentator.resampling import change_spacing

    img = nib.Nifti1Image(image.get_fdata(caching="unchanged"), image.affine) if copy else image
    img = as_closest_canonical(img)
    resample = stages[0].resample
    canonical_shape = None
    if resample is not None:
        canonical_shape = img.shape
        img = change_spacing(img, [resample] * 3, order=1, dtype=np.int32, nr_cpus=1)
    return Prepared(
        data=_narrow(np.asanyarray(img.dataobj)),
        spacing=_spacing(img),
        task_ids=tuple(s.task_id for s in stages),
        source_affine=np.asarray(image.affine),
        canonical_shape=canonical_shape,
        **extra,
    )


def _narrow(data: np.ndarray) -> np.ndarray:
    """The model-grid array in the fewest bytes that give nnU-Net the same float32 input: ``change_spacing``'s
    int32 HU as int16 when they fit, an unresampled float64 copy as float32 (the network's input dtype)."""
    info = np.iinfo(np.int16)
    if data.dtype == np.int32 and data.size and info.min <= data.min() and data.max() <= info.max:
        return data.astype(np.int16)
    if data.dtype == np.float64:
        return data.astype(np.float32)
    return data


def first_pass(spec: totalseg.TaskSpec, image: nib.Nifti1Image) -> Prepared:
    """The first model pass of a scan: the 6 mm crop pass under ``roi_subset``, else the task's own models."""
    if spec.crop_stage is not None:
        return prepare(image, (spec.crop_stage,), crop_pass=True)
    return prepare(image, spec.stages)


def labels_home(prepared: Prepared, labels: np.ndarray, order: Literal["C", "F"] = "C") -> np.ndarray:
    """Labels from the model's grid back onto the image ``prepare`` was given: TotalSegmentator's order-0
    resampling (as an index gather) and ``undo_canonical``. ``order``: the memory order to build it in (the
    scan's, so the passport reads mask and CT in one order without transposing either)."""
    from totalsegmentator.alignment import undo_canonical

    if prepared.canonical_shape is not None:
        # The gather is separable per axis: made on the transposed grid it comes out in Fortran order for free.
        flip = order == "F"
        labels = resample_labels(labels.T if flip else labels, prepared.canonical_shape[:: -1 if flip else 1])
        labels = labels.T if flip else labels
    # undo_canonical reads only the source's orientation; the affines do not change the data.
    source = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), prepared.source_affine)
    img = undo_canonical(nib.Nifti1Image(labels, np.eye(4)), source)
    home: np.ndarray = np.asanyarray(img.dataobj).astype(np.uint8, order=order)
    return home


def memory_order(image: nib.Nifti1Image) -> Literal["C", "F"]:
    """``"F"`` for an image whose voxels are Fortran-ordered (NIfTI's on-disk order, as nibabel loads them), else
    ``"C"``. Reads no file: an image still on disk counts as Fortran-ordered."""
    if nib.is_proxy(image.dataobj):
        return "F"
    data = np.asanyarray(image.dataobj)
    return "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"


def crop_for_roi(
    spec: totalseg.TaskSpec, image: nib.Nifti1Image, rough: Prepared, labels: np.ndarray
) -> Prepared | None:
    """``roi_subset`` between its passes: the ROIs' union in the 6 mm labels, TotalSegmentator's ``crop_to_mask``
    with its margin, and the main pass prepared on the crop. None when no ROI is in the scan."""
    from totalsegmentator.cropping import crop_to_mask

    inv = {v: k for k, v in spec.label_map.items()}
    crop_mask = np.isin(labels_home(rough, labels), [inv[r] for r in spec.roi_subset or ()]).astype(np.uint8)
    if crop_mask.sum() == 0:
        return None
    img_in = nib.Nifti1Image(image.get_fdata(caching="unchanged"), image.affine)
    img_in, bbox = crop_to_mask(
        img_in, nib.Nifti1Image(crop_mask, image.affine), addon=list(totalseg.ROI_CROP_ADDON), dtype=np.int32
    )
    return prepare(img_in, spec.stages, copy=False, crop_bbox=bbox)


def _spacing(img: nib.Nifti1Image) -> tuple[float, float, float]:
    x, y, z = (float(s) for s in img.header.get_zooms()[:3])
    return x, y, z


def finish(
    spec: totalseg.TaskSpec,
    prepared: Prepared | None,
    labels: np.ndarray | None,
    shape: tuple[int, ...],
    order: Literal["C", "F"] = "C",
) -> np.ndarray:
    """The main pass's labels as the scan's ``uint8`` mask of ``shape`` in memory ``order``; ``prepared`` None: an
    empty ROI crop."""
    if prepared is None:
        return np.zeros(shape, dtype=np.uint8, order=order)
    assert labels is not None, "a prepared pass has its labels"
    seg = labels_home(prepared, labels, order)
    if prepared.crop_bbox is None:
        return seg
    out = np.zeros(shape, dtype=np.uint8, order=order)
    (x0, x1), (y0, y1), (z0, z1) = prepared.crop_bbox
    out[x0:x1, y0:y1, z0:z1] = seg
    out *= np.isin(out, list(spec.output_labels)).astype(np.uint8)
    return out


def segment_in_process(segmenter: Inferer, image: nib.Nifti1Image, timings: dict[str, float]) -> np.ndarray:
    """All stages of one scan in this process (CLI, Serve): the batch job's functions, in its order."""
    spec = segmenter.spec
    t = time.perf_counter()
    prepared = first_pass(spec, image)
    timings["resample_in_s"] = time.perf_counter() - t
    first = _infer(segmenter, prepared, timings)
    labels: np.ndarray | None = first
    main: Prepared | None = prepared
    if prepared.crop_pass:
        t = time.perf_counter()
        main = crop_for_roi(spec, image, prepared, first)
        timings["roi_crop_s"] = time.perf_counter() - t
        labels = None if main is None else _infer(segmenter, main, timings)
    t = time.perf_counter()
    mask = finish(spec, main, labels, image.shape, memory_order(image))
    timings["resample_out_s"] = time.perf_counter() - t
    return mask


def _infer(segmenter: Inferer, prepared: Prepared, timings: dict[str, float]) -> np.ndarray:
    t = time.perf_counter()
    labels = segmenter.infer(prepared)
    timings["network_s"] = timings.get("network_s", 0.0) + time.perf_counter() - t
    return labels


def resample_labels(seg: np.ndarray, target_shape: Sequence[int]) -> np.ndarray:
    """TotalSegmentator's order-0 ``change_spacing`` to ``target_shape`` as an index gather, voxel for voxel.

    ``change_spacing`` calls ``scipy.ndimage.zoom(order=0, mode="nearest")`` on a float64 copy: output voxel k
    takes input voxel ``floor(k * (n_in - 1) / (n_out - 1) + 0.5)`` on every axis (scipy's ``NI_ZoomShift``
    with ``grid_mode=False``). Gathering those indices gives the same uint8 array without the 8-byte volume
    (630 MB on a 512x512x300 CT) and several times faster.
    """
    zoom = np.asarray(target_shape, dtype=np.float64) / np.asarray(seg.shape)
    out_shape = [round(float(n * z)) for n, z in zip(seg.shape, zoom)]  # as scipy derives it from the zoom
    out = seg
    for axis, (n_in, n_out) in enumerate(zip(seg.shape, out_shape)):
        factor = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        index = np.floor(np.arange(n_out, dtype=np.float64) * factor + 0.5).astype(np.intp)
        out = np.take(out, np.clip(index, 0, n_in - 1), axis=axis)
    return np.ascontiguousarray(out, dtype=np.uint8)
