"""Scans read from wherever they live: ``s3://`` objects and prefixes here, everything else by the core's
:func:`ray_app.core.scan.load_scan`, so the core itself never talks to a cloud."""

from __future__ import annotations

import os

from ray_app.core import scan as core_scan
from ray_app.core.errors import ScanNotFound
from ray_app.core.scan import Scan, Source, load_bytes, load_dicom_series
from ray_app.settings import Settings
from ray_app.storage import objects


def load_scan(source: Source, scan_id: str, settings: Settings, *, kind: str | None = None) -> Scan:
    """Read and validate a scan from an ``s3://`` URI (a key, or a prefix ending in ``/`` for a DICOM series), a
    local path, bytes, a list of DICOM files or an in-memory NIfTI image."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).startswith("s3://"):
        return _load_s3(os.fspath(source), scan_id, settings, kind)
    return core_scan.load_scan(source, scan_id, settings, kind=kind)


def _load_s3(uri: str, scan_id: str, settings: Settings, kind: str | None) -> Scan:
    """One object is a file, a prefix ending in ``/`` a DICOM series (within one input-size budget)."""
    if uri.endswith("/"):
        budget = settings.max_input_bytes
        blobs = []
        for member in objects.list_uris(uri):
            if member.endswith("/"):  # a console-made "folder" marker, not a file
                continue
            blob = objects.read_bytes(member, max_bytes=budget)
            budget -= len(blob)
            blobs.append(blob)
        if not blobs:
            raise ScanNotFound("no objects under the given prefix", scan_id=scan_id)
        return load_dicom_series(blobs, scan_id, settings, source_uri=uri)
    data = objects.read_bytes(uri, max_bytes=settings.max_input_bytes)
    return load_bytes(data, scan_id, kind=kind, settings=settings, source_uri=uri)
