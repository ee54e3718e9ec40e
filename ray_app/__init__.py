"""TotalSegmentator on Ray: CT scans in, multilabel masks and anatomical passports out.

The public surface, what a notebook imports::

    from ray_app import Settings, Segmenter, load_scan, build_passport, BatchConfig, run_batch

Layers, each importing only those above it in this list (``tests/test_architecture.py`` keeps it so):
``settings`` → ``core`` (scan, segmenter, passport, outputs; no Ray, HTTP or cloud) → ``storage`` (objects, scans
from S3, manifests, sinks, stores) → ``adapters.batch`` / ``adapters.serve`` → ``ops`` (cloud setup, cluster,
cost) and ``demo`` → ``adapters.cli``. Names are imported lazily so ``import ray_app`` starts neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Settings": "ray_app.settings",
    "get_settings": "ray_app.settings",
    "Scan": "ray_app.core.scan",
    "Segmenter": "ray_app.core.segmenter",
    "build_passport": "ray_app.core.passport",
    "validate_passport": "ray_app.core.passport",
    "segment_scan": "ray_app.core.pipeline",
    "load_scan": "ray_app.storage.scans",
    "BatchConfig": "ray_app.adapters.batch",
    "run_batch": "ray_app.adapters.batch",
}
__all__ = [
    "BatchConfig",
    "Scan",
    "Segmenter",
    "Settings",
    "build_passport",
    "get_settings",
    "load_scan",
    "run_batch",
    "segment_scan",
    "validate_passport",
]

if TYPE_CHECKING:
    from ray_app.adapters.batch import BatchConfig, run_batch
    from ray_app.core.passport import build_passport, validate_passport
    from ray_app.core.pipeline import segment_scan
    from ray_app.core.scan import Scan
    from ray_app.core.segmenter import Segmenter
    from ray_app.settings import Settings, get_settings
    from ray_app.storage.scans import load_scan


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ray_app' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
