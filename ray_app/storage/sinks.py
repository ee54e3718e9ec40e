"""Where results go: per-scan artifact files, the passport index (DynamoDB or SQLite) and the job summary.

One import for the adapters; each part lives in its own module: :mod:`~ray_app.storage.artifacts`,
:mod:`~ray_app.storage.passports` (the store contract), :mod:`~ray_app.storage.dynamodb`,
:mod:`~ray_app.storage.sqlite` and :mod:`~ray_app.storage.summary`.
"""

from __future__ import annotations

import re

from ray_app import storage
from ray_app.core.errors import InvalidPassport, PassportTooLarge
from ray_app.storage.artifacts import CONTENT_TYPES, LARGE_OBJECT_BYTES, ArtifactSink
from ray_app.storage.dynamodb import (
    INDEX_ATTRIBUTES,
    JOB_INDEX,
    MAX_INLINE_BYTES,
    DynamoDBPassportStore,
    create_table,
    dynamodb_item,
    index_item_bytes,
    item_bytes,
)
from ray_app.storage.passports import PassportStore
from ray_app.storage.sqlite import SQLitePassportStore
from ray_app.storage.summary import (
    SUMMARY_SCHEMA,
    clear_summary,
    read_summary,
    read_summary_table,
    summary_parts,
    summary_table,
    write_summary,
)

__all__ = [
    "CONTENT_TYPES",
    "INDEX_ATTRIBUTES",
    "JOB_INDEX",
    "LARGE_OBJECT_BYTES",
    "MAX_INLINE_BYTES",
    "SUMMARY_SCHEMA",
    "ArtifactSink",
    "DynamoDBPassportStore",
    "InvalidPassport",
    "PassportStore",
    "PassportTooLarge",
    "SQLitePassportStore",
    "create_table",
    "dynamodb_item",
    "index_item_bytes",
    "item_bytes",
    "open_passport_store",
    "clear_summary",
    "read_summary",
    "read_summary_table",
    "summary_parts",
    "summary_table",
    "write_summary",
]

_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")


def open_passport_store(uri: str) -> PassportStore:
    """``dynamodb://TABLE`` or ``sqlite:///relative.db`` / ``sqlite:////absolute/path.db``."""
    if uri.startswith("dynamodb://"):
        table = uri[len("dynamodb://") :]
        if not _TABLE_NAME.fullmatch(table):
            raise storage.UnsupportedUri(f"invalid DynamoDB table name in {uri!r}")
        return DynamoDBPassportStore(table)
    if uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"):
        return SQLitePassportStore(uri[len("sqlite:///") :])
    raise storage.UnsupportedUri(f"unsupported passport store {uri!r}: use dynamodb://TABLE or sqlite:///PATH")
