"""The one error model: every failure a user can act on is a :class:`RayAppError` subclass that carries

* ``code``: a stable machine-readable name (failure records, passports, HTTP bodies, metrics tags);
* ``http_status``: what the Serve endpoint answers for it;
* ``retryable``: whether trying the same input again may help (a storage hiccup, a busy replica) or not (the
  scan itself is unusable);
* a message that names the scan by id only, never a file name or a patient identifier.

Batch, Serve, the CLI and the passport all read an exception through :func:`describe`, which also maps
exceptions from outside the package (``MemoryError``, torch's out-of-memory errors, anything unexpected) onto
the same model. A failure recorded in one place and read in another (a batch stage's failure record, a failed
passport) comes back as an exception of the right class with :func:`from_code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: Every error class by its code (filled as classes are defined; one class per code).
_BY_CODE: dict[str, type[RayAppError]] = {}


class RayAppError(Exception):
    """Base class; ``code`` is a stable machine-readable name used in failure records and HTTP bodies."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, scan_id: str | None = None):
        self.scan_id = scan_id
        self.message = message
        super().__init__(f"[{scan_id}] {message}" if scan_id else message)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled (Ray, process pools) as class, message, scan id and state: subclasses with other __init__
        # signatures and per-instance codes survive the trip.
        return (_restore, (type(self), self.message, self.scan_id, dict(self.__dict__)))

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            # One class per code; the same class defined again (a module reload) replaces itself.
            if cls.code in _BY_CODE and _BY_CODE[cls.code].__qualname__ != cls.__qualname__:
                raise TypeError(f"error code {cls.code!r} is already used by {_BY_CODE[cls.code].__name__}")
            _BY_CODE[cls.code] = cls


_BY_CODE[RayAppError.code] = RayAppError


def _restore(cls: type[RayAppError], message: str, scan_id: str | None, state: dict[str, object]) -> RayAppError:
    exc = cls.__new__(cls)
    RayAppError.__init__(exc, message, scan_id=scan_id)
    exc.__dict__.update(state)
    return exc


class InternalError(RayAppError):
    """Anything the package did not expect (a bug, or a library failing in a new way); see the log."""

    code = "internal_error"


class OutOfMemory(RayAppError):
    """The scan needed more memory than its worker has: another worker (or a later try) may have room."""

    code = "out_of_memory"
    http_status = 503
    retryable = True


class RecordedFailure(RayAppError):
    """A failure read back from a record (a batch stage's row, a stored passport) whose code names no class here.

    Carries the recorded ``code`` on the instance; status and retryability are the base class's.
    """

    def __init__(self, code: str, message: str, *, scan_id: str | None = None):
        super().__init__(message, scan_id=scan_id)
        self.code = code  # type: ignore[misc]  # the one class whose code is per instance


class PreflightError(RayAppError):
    """A job's destination, input or cluster does not fit the job: found before anything runs."""

    code = "preflight_failed"


class WeightsMissing(RayAppError):
    """TotalSegmentator weights are absent and could not be downloaded."""

    code = "weights_missing"
    http_status = 503
    retryable = True  # a download may succeed later, or another replica have them


class ScanError(RayAppError):
    """The scan itself is unusable; retrying will not help (422)."""

    code = "invalid_scan"
    http_status = 422


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
    http_status = 413


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
    http_status = 422


class WorkerLost(RayAppError):
    """The Ray worker segmenting the scan died on every try (node loss such as a Spot reclaim, the kernel's OOM
    killer, a native crash): the batch job gave up on the scan after its bounded retries instead of hanging."""

    code = "worker_lost"
    http_status = 503
    retryable = True


class InvalidRoiSubset(RayAppError):
    """An ROI subset naming structures the model does not know."""

    code = "invalid_roi_subset"
    http_status = 422


class UnsupportedTask(RayAppError):
    """A TotalSegmentator task this package does not run."""

    code = "unsupported_task"
    http_status = 422


# ------------------------------------------------------------------------------------ storage and inputs
# Raised by ``ray_app.storage`` (which re-exports them); defined here so that the whole model is in one place and
# :func:`from_code` knows every code without importing boto3.


class StorageError(RayAppError):
    """An I/O failure that is not the caller's fault (after botocore's retries): retrying may help."""

    code = "storage_error"
    http_status = 502
    retryable = True


class ObjectNotFound(StorageError):
    """The URI names no object (or the table does not exist)."""

    code = "object_not_found"
    http_status = 422
    retryable = False


class ObjectTooLarge(StorageError):
    """An object larger than the limit the caller set."""

    code = "object_too_large"
    http_status = 413
    retryable = False


class UnsupportedUri(RayAppError):
    """A URI that is neither a local path nor ``s3://bucket/key`` (``file://``, ``http://``, ``gs://`` ...)."""

    code = "unsupported_uri"
    http_status = 403


class InvalidId(RayAppError):
    """An id that is unsafe as a path segment or key (see ``ray_app.storage.keys``)."""

    code = "invalid_id"
    http_status = 422


class ManifestError(RayAppError):
    """The manifest as a whole cannot be used."""

    code = "invalid_manifest"
    http_status = 422


class InvalidSummary(RayAppError):
    """A file given as a job summary that is not Parquet (the manifest, a passport, ...)."""

    code = "invalid_summary"
    http_status = 422


class InvalidPassport(RayAppError):
    """A passport that does not match its schema: refused by the stores (a bug upstream, not the input's fault)."""

    code = "invalid_passport"


class PassportTooLarge(RayAppError):
    """A passport over the store's item limit."""

    code = "passport_too_large"


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ErrorInfo:
    """What every adapter needs to know about a failure."""

    code: str
    message: str
    http_status: int
    retryable: bool


#: Longest message kept from an unexpected exception's text.
MAX_MESSAGE = 1000


def describe(exc: BaseException) -> ErrorInfo:
    """The code, message, HTTP status and retryability of any exception.

    A :class:`RayAppError` speaks for itself; ``MemoryError`` and torch's out-of-memory errors are
    ``out_of_memory``; anything else is ``internal_error`` with its type and text.
    """
    if isinstance(exc, RayAppError):
        return ErrorInfo(exc.code, exc.message, exc.http_status, exc.retryable)
    if isinstance(exc, MemoryError) or is_out_of_memory(exc):
        return describe(OutOfMemory("the scan needed more memory than the worker has"))
    text = f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE]
    return ErrorInfo(InternalError.code, text, InternalError.http_status, InternalError.retryable)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch reports exhausted memory as ``torch.OutOfMemoryError`` (GPU) or a plain RuntimeError from its CPU
    allocator, not as MemoryError."""
    return isinstance(exc, MemoryError) or (
        type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))
    )


def error_classes() -> list[type[RayAppError]]:
    """Every error class of the model, one per code."""
    return list(_BY_CODE.values())


def error_class(code: str) -> type[RayAppError] | None:
    """The class whose stable code is ``code``, if any."""
    return _BY_CODE.get(code)


def from_code(code: str, message: str, *, scan_id: str | None = None) -> RayAppError:
    """The exception a recorded failure stands for: an instance of the class with that ``code`` (so its status
    and retryability come along), or a :class:`RecordedFailure` carrying an unknown code."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RecordedFailure(code, message, scan_id=scan_id)
    return _restore(cls, message, scan_id, {})
