"""Errors a user can act on. Each names the scan (by id, never by patient identifiers) and the problem."""

from __future__ import annotations


class RayAppError(Exception):
    """Base class; ``code`` is a stable machine-readable name used in failure records and HTTP bodies."""

    code = "error"

    def __init__(self, message: str, *, scan_id: str | None = None):
        self.scan_id = scan_id
        self.message = message
        super().__init__(f"[{scan_id}] {message}" if scan_id else message)


class PreflightError(RayAppError):
    """A job's destination, input or cluster does not fit the job: found before anything runs."""

    code = "preflight_failed"


class WeightsMissing(RayAppError):
    """TotalSegmentator weights are absent and could not be downloaded."""

    code = "weights_missing"


class ScanError(RayAppError):
    """The scan itself is unusable; retrying will not help."""

    code = "invalid_scan"


class ScanNotFound(ScanError):
    """The path or URI names nothing."""

    code = "scan_not_found"


class EmptyScan(ScanError):
    """A zero-byte input (often a failed upload or copy)."""

    code = "empty_file"


class UnreadableScan(ScanError):
    """Not a NIfTI image, DICOM series or zip of one, or pixel data that cannot be decoded."""

    code = "unreadable_scan"


class TruncatedScan(ScanError):
    """The file ends before the image its header declares (interrupted transfer)."""

    code = "truncated_file"


class InputTooLarge(ScanError):
    """More input bytes than ``settings.max_input_bytes``."""

    code = "input_too_large"


class UnsafeArchivePath(ScanError):
    """A zip member with an absolute or ``..`` path: refused instead of trusting any extraction logic."""

    code = "unsafe_archive_path"


class DecompressionBomb(ScanError):
    """An archive or gzip stream that would expand far beyond what a scan needs."""

    code = "decompression_bomb"


class NotVolumetric(ScanError):
    """2D (one slice) or 4D+ data: the models segment single 3D volumes."""

    code = "not_3d"


class UnsupportedDtype(ScanError):
    """Complex, boolean or structured (e.g. RGB) voxels cannot be Hounsfield units."""

    code = "unsupported_dtype"


class NonFiniteVoxels(ScanError):
    """NaN or infinite voxels would poison normalisation and statistics."""

    code = "non_finite_voxels"


class InvalidSpacing(ScanError):
    """Zero, negative, non-finite or absurd voxel spacing (outside the settings' min/max)."""

    code = "invalid_spacing"


class InvalidAffine(ScanError):
    """A voxel-to-world matrix that is not finite or not invertible: no world geometry."""

    code = "invalid_affine"


class TooManyVoxels(ScanError):
    """More voxels than ``settings.max_voxels`` (checked from the header, before allocating)."""

    code = "too_many_voxels"


class MissingSlices(ScanError):
    """DICOM slice positions are not evenly spaced (gaps, tilt or irregular spacing)."""

    code = "missing_slices"


class DuplicateSlices(ScanError):
    """Two or more DICOM images at the same slice position."""

    code = "duplicate_slices"


class MixedSeries(ScanError):
    """Images from several series, frames of reference, sizes or orientations in one input."""

    code = "mixed_series"


class NotCT(ScanError):
    """The DICOM modality is not CT (e.g. MR or PT); refused or flagged per ``settings.modality_policy``."""

    code = "not_ct"


class NotHounsfield(ScanError):
    """Intensities that cannot be CT Hounsfield units; refused or flagged per ``settings.modality_policy``."""

    code = "not_hounsfield"


class DicomSegUnavailable(RayAppError):
    """A DICOM-SEG cannot be made for this scan (not DICOM input, or the source lacks required UIDs)."""

    code = "dicom_seg_unavailable"


class WorkerLost(RayAppError):
    """The Ray worker segmenting the scan died on every try (node loss such as a Spot reclaim, the kernel's OOM
    killer, a native crash): the batch job gave up on the scan after its bounded retries instead of hanging."""

    code = "worker_lost"
