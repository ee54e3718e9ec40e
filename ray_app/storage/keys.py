"""Safe identifiers and the result key layout ``{prefix}/{scan_id}/{model_key}/{name}``.

Ids come from manifests and HTTP requests and become path segments and database keys, so they are checked
against one strict pattern: a leading letter or digit (which also rules out spreadsheet formulas such as
``=HYPERLINK(...)``), then letters, digits, ``.``, ``_``, ``-``; never ``..``, ``/`` or control characters.
"""

from __future__ import annotations

import posixpath
import re

from ray_app.core.errors import InvalidId
from ray_app.storage import parse_uri

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def looks_like_formula(value: str) -> bool:
    """True for text a spreadsheet would evaluate (CSV/formula injection)."""
    return value.startswith(_FORMULA_START)


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`InvalidId` saying why."""
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidId(f"{what} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidId(f"{what} {value!r} contains control characters")
    if looks_like_formula(value):
        raise InvalidId(f"{what} {value!r} looks like a spreadsheet formula")
    if "/" in value or "\\" in value or ".." in value:
        raise InvalidId(f"{what} {value!r} contains a path separator or '..'")
    if not _SAFE_ID.fullmatch(value):
        raise InvalidId(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_scan_id(scan_id: object) -> str:
    return validate_id(scan_id, "scan_id")


def result_uri(output_prefix: str, scan_id: str, model_key: str, name: str) -> str:
    """``{prefix}/{scan_id}/{model_key}/{name}``, checked to stay strictly inside ``output_prefix``."""
    return _inside(output_prefix, (("scan_id", scan_id), ("model_key", model_key), ("file name", name)))


def scan_file_uri(output_prefix: str, scan_id: str, name: str) -> str:
    """``{prefix}/{scan_id}/{name}`` (the ``ray-app segment`` layout), with the same guarantees."""
    return _inside(output_prefix, (("scan_id", scan_id), ("file name", name)))


def job_file_uri(output_prefix: str, job_id: str, name: str) -> str:
    """``{prefix}/_jobs/{job_id}/{name}``: a job's own files (its record ``job.json``, its summary), beside the scans'
    folders; no scan id can start with ``_``, so no scan's folder is ever ``_jobs``."""
    return f"{output_prefix.rstrip('/')}/_jobs/{job_id}/{name}"


def _inside(output_prefix: str, parts: tuple[tuple[str, str], ...]) -> str:
    for what, value in parts:
        validate_id(value, what)
    parse_uri(output_prefix)  # refuses unsupported schemes and bad buckets
    prefix = output_prefix.rstrip("/")
    if not prefix:
        raise InvalidId(f"output prefix {output_prefix!r} is empty or the filesystem root")
    rest = "/".join(value for _, value in parts)
    # The validated segments cannot climb; normalising proves it and guards future pattern changes.
    if posixpath.normpath(rest) != rest or rest.startswith("/"):
        raise InvalidId(f"result key {rest!r} would leave {output_prefix!r}")
    return f"{prefix}/{rest}"
