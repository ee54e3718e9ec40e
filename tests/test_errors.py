"""The one error model (``ray_app.core.errors``): codes, HTTP statuses and retryability in one place."""

from __future__ import annotations

import pickle

import pytest

from ray_app import storage
from ray_app.core import errors
from ray_app.core.errors import RayAppError, describe, from_code
from ray_app.storage.keys import InvalidId
from ray_app.storage.manifest import ManifestError
from ray_app.storage.sinks import InvalidPassport, PassportTooLarge

#: What the Serve endpoint answered for each code before the model existed (its old ``_status_for``): kept.
SERVE_STATUSES = {
    "truncated_file": 422,
    "not_ct": 422,
    "invalid_scan": 422,
    "scan_not_found": 422,
    "empty_file": 422,
    "decompression_bomb": 422,
    "invalid_id": 422,
    "object_not_found": 422,
    "invalid_roi_subset": 422,
    "input_too_large": 413,
    "object_too_large": 413,
    "unsupported_uri": 403,
    "storage_error": 502,
    "weights_missing": 503,
    "out_of_memory": 503,
    "internal_error": 500,
    "invalid_passport": 500,
    "passport_too_large": 500,
    "error": 500,
}


@pytest.mark.parametrize(("code", "status"), sorted(SERVE_STATUSES.items()))
def test_every_code_keeps_its_http_status(code, status):
    cls = errors.error_class(code)
    assert cls is not None and cls.code == code
    assert cls.http_status == status
    assert describe(from_code(code, "m")).http_status == status


def test_storage_errors_are_the_models_classes():
    assert storage.StorageError is errors.StorageError and storage.ObjectNotFound is errors.ObjectNotFound
    assert storage.ObjectTooLarge is errors.ObjectTooLarge and storage.UnsupportedUri is errors.UnsupportedUri
    for cls in (InvalidId, ManifestError, InvalidPassport, PassportTooLarge):
        assert issubclass(cls, RayAppError) and errors.error_class(cls.code) is cls


def test_codes_are_unique_and_every_class_says_whether_a_retry_helps():
    classes = errors.error_classes()
    assert len({c.code for c in classes}) == len(classes)
    retryable = {c.code for c in classes if c.retryable}
    assert {"storage_error", "out_of_memory", "worker_lost", "weights_missing"} <= retryable
    assert not retryable & {"truncated_file", "invalid_id", "object_not_found", "input_too_large", "internal_error"}
    with pytest.raises(TypeError):

        class Again(RayAppError):
            code = "truncated_file"


def test_describe_maps_memory_and_unknown_exceptions():
    assert describe(MemoryError()).code == "out_of_memory"
    assert describe(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB")).code == (
        "out_of_memory"
    )

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError, by name
        pass

    oom = describe(OutOfMemoryError("CUDA out of memory"))
    assert (oom.code, oom.http_status, oom.retryable) == ("out_of_memory", 503, True)
    boom = describe(ValueError("x" * 5000))
    assert boom.code == "internal_error" and boom.message.startswith("ValueError: ") and boom.http_status == 500
    assert len(boom.message) <= errors.MAX_MESSAGE


def test_a_recorded_failure_comes_back_as_its_class():
    exc = from_code("truncated_file", "the file ends early", scan_id="s1")
    assert isinstance(exc, errors.TruncatedScan) and exc.scan_id == "s1" and exc.message == "the file ends early"
    assert str(exc) == "[s1] the file ends early"
    unknown = from_code("some_future_code", "m")
    assert isinstance(unknown, errors.RecordedFailure) and describe(unknown).code == "some_future_code"
    assert describe(pickle.loads(pickle.dumps(unknown))).code == "some_future_code"
