"""Voxel checks once an image is in memory: finite values, and whether the intensities can be CT Hounsfield
units at all; a modality problem is refused or, with ``modality_policy="flag"``, kept as a warning."""

from __future__ import annotations

import math

import numpy as np

from ray_app.core.errors import NonFiniteVoxels, NotHounsfield, ScanError
from ray_app.settings import Settings

#: Enough samples for stable percentiles in the Hounsfield plausibility check.
_HU_SAMPLE = 2_000_000


def check_voxels(data: np.ndarray, scan_id: str, settings: Settings, warnings: list[str]) -> tuple[float, float]:
    """Non-finite voxels, then whether the intensities can be Hounsfield units; returns the intensity range."""
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise NonFiniteVoxels(f"{n_bad} voxel(s) are NaN or infinite", scan_id=scan_id)
    lo, hi = float(data.min()), float(data.max())
    problem = _hu_problem(data, lo, hi)
    if problem:
        modality_problem(NotHounsfield(problem, scan_id=scan_id), settings, warnings)
    return lo, hi


def _hu_problem(data: np.ndarray, lo: float, hi: float) -> str | None:
    """Why these intensities cannot be CT Hounsfield units, or None.

    A CT in HU virtually always contains air (about -1000) or fat (about -100): an image with nothing below -200
    is MR, PET, or CT that was not rescaled to HU or was normalised. Its bulk (99.5th percentile) stays below
    dense bone; scanner padding (e.g. -3024) is legitimate and not judged.
    """
    if lo > -200:
        return (
            f"no voxel is below -200 (range {lo:g} to {hi:g}): the image has no air or fat, so its intensities "
            "are not CT Hounsfield units (MR, PET, or unscaled/normalised data?)"
        )
    step = max(1, math.ceil((data.size / _HU_SAMPLE) ** (1 / 3)))
    p_hi = float(np.percentile(data[::step, ::step, ::step], 99.5))  # a strided view: no full-size copy
    if p_hi > 4000 or hi > 50000 or lo < -50000:
        return f"intensities range {lo:g} to {hi:g} (99.5th percentile {p_hi:g}): far outside the Hounsfield scale"
    return None


def modality_problem(error: ScanError, settings: Settings, warnings: list[str]) -> None:
    if settings.modality_policy == "refuse":
        raise error
    warnings.append(f"{error.code}: {error.message}")
