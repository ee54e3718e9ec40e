"""Errors a user can act on. Each names the scan (by id, never by patient identifiers) and the problem."""

from __future__ import annotations


class RayAppError(Exception):
    """Base class; ``code`` is a stable machine-readable name used in failure records and HTTP bodies."""

    code = "error"

    def __init__(self, message: str, *, scan_id: str | None = None):
        self.scan_id = scan_id
        self.message = message
        super().__init__(f"[{scan_id}] {message}" if scan_id else message)


class WeightsMissing(RayAppError):
    """TotalSegmentator weights are absent and could not be downloaded."""

    code = "weights_missing"


class ScanError(RayAppError):
    """The scan itself is unusable; retrying will not help."""

    code = "invalid_scan"
