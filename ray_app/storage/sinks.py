"""Where results go: per-scan artifact files, the passport index (DynamoDB or SQLite) and the job summary.

Artifacts live at ``{output_prefix}/{scan_id}/{model_key}/{name}`` (see :mod:`ray_app.storage.keys`), locally or on
S3 with server-side encryption. Passports are indexed by ``(scan_id, model_key)``; a write is conditional
on ``created_at`` so a late retry of an old run can never replace a newer result.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from decimal import Decimal, DecimalException
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from ray_app import storage
from ray_app.core.errors import RayAppError
from ray_app.storage.keys import result_uri, scan_file_uri, validate_id

CONTENT_TYPES = {
    ".nii.gz": "application/gzip",
    ".json": "application/json",
    ".png": "image/png",
    ".dcm": "application/dicom",
    ".parquet": "application/vnd.apache.parquet",
}


#: Objects larger than this are the ones the bucket's lifecycle rule moves to Glacier Instant Retrieval
#: (``ray_app.ops.aws_setup.lifecycle_rule``): Glacier IR bills every object as at least 128 KiB, so small
#: passports and previews stay in Standard. The job summary counts the bytes written above and below it.
LARGE_OBJECT_BYTES = 128 * 1024


class InvalidPassport(RayAppError):
    code = "invalid_passport"


class PassportTooLarge(RayAppError):
    code = "passport_too_large"


# --------------------------------------------------------------------------------------------- artifacts


class ArtifactSink:
    """Writes one scan's files under the result layout; each object is written atomically."""

    def __init__(self, output_prefix: str, *, per_model: bool = True):
        """``per_model=False`` drops the model level (``{prefix}/{scan_id}/{name}``), as ``ray-app segment`` writes."""
        storage.parse_uri(output_prefix)
        self.output_prefix = output_prefix
        self.per_model = per_model

    def uri_for(self, scan_id: str, model_key: str, name: str) -> str:
        if self.per_model:
            return result_uri(self.output_prefix, scan_id, model_key, name)
        return scan_file_uri(self.output_prefix, scan_id, name)

    def put(self, scan_id: str, model_key: str, name: str, data: bytes, content_type: str | None = None) -> str:
        """Write ``data`` as ``name`` for this scan and model; returns the object's URI."""
        uri = self.uri_for(scan_id, model_key, name)
        if content_type is None:
            content_type = next((ct for ext, ct in CONTENT_TYPES.items() if name.endswith(ext)), None)
        return storage.write_bytes(uri, data, content_type)


# --------------------------------------------------------------------------------------------- passports


class _Record:
    """The indexed fields of a passport, validated once for both stores."""

    def __init__(self, passport: dict, job_id: str):
        if not isinstance(passport, dict):
            raise InvalidPassport(f"passport must be a dict, got {type(passport).__name__}")
        self.scan_id = validate_id(passport.get("scan_id"), "passport scan_id")
        model = passport.get("model")
        if not isinstance(model, dict):
            raise InvalidPassport("passport has no 'model' dict", scan_id=self.scan_id)
        self.model_key = validate_id(model.get("key"), "passport model.key")
        self.job_id = validate_id(job_id, "job_id")
        self.status = passport.get("status")
        if not isinstance(self.status, str) or not self.status:
            raise InvalidPassport("passport has no 'status' string", scan_id=self.scan_id)
        self.created_at = passport.get("created_at")
        self.order_key = _order_key(self.created_at, self.scan_id)
        try:
            self.json = json.dumps(passport, allow_nan=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidPassport(f"passport is not JSON-serialisable: {exc}", scan_id=self.scan_id) from exc


def _order_key(created_at: object, scan_id: str) -> str:
    """``created_at`` as fixed-width UTC text, so string order is time order (needed by DynamoDB conditions).

    A timestamp without an offset is taken as UTC, which the passport contract promises.
    """
    if not isinstance(created_at, str):
        raise InvalidPassport("passport has no 'created_at' string", scan_id=scan_id)
    try:
        dt = datetime.fromisoformat(created_at)
    except ValueError as exc:
        raise InvalidPassport(f"created_at {created_at!r} is not ISO-8601", scan_id=scan_id) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PassportStore(ABC):
    """The latest passport per ``(scan_id, model_key)``, plus lookups by job."""

    @abstractmethod
    def put(self, passport: dict, job_id: str, passport_uri: str | None = None) -> bool:
        """Store unless the stored item has a newer ``created_at``; returns whether it wrote.

        ``passport_uri``: where the same passport was written in full (``passport.json``); a store may then keep a
        compact record that points there instead of a copy."""

    @abstractmethod
    def get(self, scan_id: str, model_key: str) -> dict | None:
        """The full passport, or None."""

    def status(self, scan_id: str, model_key: str) -> str | None:
        """The stored passport's status (``ok``, ``failed``, ...), or None when there is none: the resume check."""
        passport = self.get(scan_id, model_key)
        return None if passport is None else passport.get("status")

    def statuses(self, scan_ids: list[str], model_key: str) -> dict[str, tuple[str, str | None]]:
        """``scan_id -> (status, error code)`` for those of ``scan_ids`` with a stored passport: the resume check of
        many scans at once. Stores override it with one batched read instead of one per scan."""
        found = {}
        for scan_id in scan_ids:
            doc = self.get(scan_id, model_key)
            if doc is not None:
                found[scan_id] = (doc.get("status"), (doc.get("error") or {}).get("code"))
        return found

    @abstractmethod
    def get_latest(self, scan_id: str) -> dict | None:
        """The newest passport of this scan over all models."""

    @abstractmethod
    def list_by_job(self, job_id: str) -> list[dict]:
        """Passports last written by this job, sorted by ``(scan_id, model_key)``."""

    @abstractmethod
    def delete(self, scan_id: str, model_key: str) -> None: ...

    def is_done(self, scan_id: str, model_key: str) -> bool:
        """Whether a successful passport is stored, so a rerun can skip the scan."""
        return self.status(scan_id, model_key) == "ok"


# DynamoDB ----------------------------------------------------------------------------------------------

JOB_INDEX = "job_id-index"
#: DynamoDB's limit of keys in one ``BatchGetItem``, and how often keys it left unprocessed are asked again.
BATCH_GET_KEYS = 100
BATCH_GET_ATTEMPTS = 10
#: DynamoDB refuses items over 400 KB; keep the passport attribute well below to leave room for the rest.
MAX_INLINE_BYTES = 350_000
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def _attr_size(value: dict) -> int:
    """DynamoDB's documented size of a low-level attribute value (numbers rounded up)."""
    ((kind, v),) = value.items()
    if kind == "S":
        return len(v.encode())
    if kind == "N":
        return len(v) // 2 + 2
    if kind == "B":
        return len(v)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + _attr_size(x) for k, x in v.items())
    if kind == "L":
        return 3 + sum(1 + _attr_size(x) for x in v)
    return 1  # BOOL, NULL


def _from_decimal(value: Any) -> Any:
    """Back to JSON types: integral numbers become ``int`` (exact below 2**53), others ``float``; so a float
    such as ``2.0`` comes back as the equal int ``2``."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_decimal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_decimal(v) for v in value]
    return value


#: What the job index (GSI ``job_id-index``) carries besides the keys: enough to list a job's scans with their
#: outcome without reading the table; the documents themselves are read from the table (and ``passport_uri``).
INDEX_ATTRIBUTES = ("status", "error_code")


def _json_to_dynamo(value: Any) -> dict | None:
    """A JSON-able value as a low-level DynamoDB attribute (numbers exact), or None when it has no exact form."""
    try:
        text = json.dumps(value, allow_nan=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return _to_dynamo_json(text)


def _to_dynamo_json(text: str) -> dict | None:
    """JSON text as a native attribute with ``Decimal`` numbers, or None when it cannot be one exactly.

    Floats go through their shortest ``repr`` so they come back equal. No DynamoDB form exists for
    NaN/Infinity or numbers beyond 38 digits or 1e-130..1e126, and an integral number of 2**53 or more
    cannot be told back into int or float reliably: such passports are stored compressed instead, unchanged.
    """
    inexact: list[str] = []

    def number(text: str) -> Decimal:
        value = Decimal(text)
        if value == value.to_integral_value() and abs(value) >= 2**53:
            inexact.append(text)
        return value

    value = json.loads(text, parse_float=number, parse_int=number, parse_constant=inexact.append)
    if inexact:
        return None
    try:
        return _serializer.serialize(value)
    except (DecimalException, TypeError):
        return None


def dynamodb_item(passport: dict, job_id: str, passport_uri: str | None = None) -> dict:
    """The item :class:`DynamoDBPassportStore` writes for this passport (low-level attribute values).

    With ``passport_uri`` (the batch job and Serve always have one: ``passport.json`` is written first) the item
    is compact: status, model, created_at, job id, the volume of each structure present (a structure missing
    from ``volume_ml`` is not present), the error code and message, and the URI of the full passport. About 3 KB
    for the 117 structures of ``total`` instead of about 36 KB: 3 write units instead of 36, one 4 KB read unit
    per resume check. Without one, the whole passport is kept in the item as before (a map, or gzip-compressed
    JSON when it is too large or holds numbers DynamoDB cannot represent).
    """
    rec = _Record(passport, job_id)
    item = {
        "scan_id": {"S": rec.scan_id},
        "model_key": {"S": rec.model_key},
        "job_id": {"S": rec.job_id},
        "status": {"S": rec.status},
        "created_at": {"S": rec.created_at},
        "order_key": {"S": rec.order_key},
    }
    error = passport.get("error") if isinstance(passport.get("error"), dict) else {}
    for attr, value in (("error_code", error.get("code")), ("error_message", error.get("message"))):
        if isinstance(value, str) and value:
            item[attr] = {"S": value}
    if passport_uri:
        item["passport_uri"] = {"S": passport_uri}
        model = _json_to_dynamo(passport["model"])
        if model is not None:
            item["model"] = model
        structures = passport.get("structures") if isinstance(passport.get("structures"), dict) else {}
        volumes = {
            name: s.get("volume_ml")
            for name, s in structures.items()
            if isinstance(s, dict) and s.get("present") and isinstance(s.get("volume_ml"), (int, float))
        }
        native = _json_to_dynamo(volumes)
        if native is not None:
            item["volume_ml"] = native
        return item
    native = _to_dynamo_json(rec.json)
    if native is not None and _attr_size(native) <= MAX_INLINE_BYTES:
        item["passport"] = native
    else:
        packed = gzip.compress(rec.json.encode(), mtime=0)
        if len(packed) > MAX_INLINE_BYTES:
            raise PassportTooLarge(
                f"passport is {len(packed)} bytes even compressed; DynamoDB items are limited to 400 KB",
                scan_id=rec.scan_id,
            )
        item["passport_gz"] = {"B": packed}
    return item


def item_bytes(item: dict) -> int:
    """DynamoDB's size of an item: attribute names plus values (what write and read units are counted from)."""
    return sum(len(name.encode()) + _attr_size(value) for name, value in item.items())


def index_item_bytes(item: dict) -> int:
    """Size of the item's copy in the job index: table keys, index keys and :data:`INDEX_ATTRIBUTES`."""
    names = ("scan_id", "model_key", "job_id", *INDEX_ATTRIBUTES)
    return item_bytes({k: v for k, v in item.items() if k in names})


class DynamoDBPassportStore(PassportStore):
    """Table with key ``(scan_id, model_key)`` and GSI ``job_id-index``, made by :func:`create_table`.

    Items are :func:`dynamodb_item`'s: compact, pointing at the full ``passport.json``, when the writer names it
    (``put(..., passport_uri=...)``); else the passport inline. Reads return the full passport either way: a
    compact item's passport is read from its ``passport_uri`` and checked against the item (scan, model,
    created_at), so a ``passport.json`` overwritten by another run is an error, not a silently different answer.
    ``status``/``is_done`` read only the status. ``list_by_job`` reads the GSI (keys, status, error code; on AWS
    eventually consistent), then each item.
    """

    def __init__(self, table: str):
        self.table = table

    @property
    def _ddb(self):
        return storage.client("dynamodb")

    def _error(self, exc: ClientError) -> storage.StorageError:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return storage.ObjectNotFound(f"DynamoDB table {self.table!r} does not exist")
        return storage.StorageError(f"DynamoDB table {self.table!r}: {exc}")

    def _call(self, method: str, **kwargs):
        try:
            return getattr(self._ddb, method)(TableName=self.table, **kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise
            raise self._error(exc) from exc

    def put(self, passport: dict, job_id: str, passport_uri: str | None = None) -> bool:
        item = dynamodb_item(passport, job_id, passport_uri)
        try:
            self._call(
                "put_item",
                Item=item,
                ConditionExpression="attribute_not_exists(scan_id) OR order_key <= :k",
                ExpressionAttributeValues={":k": item["order_key"]},
            )
        except ClientError:  # only the condition failure gets through _call
            return False
        return True

    @staticmethod
    def _passport(item: dict) -> dict:
        if "passport" in item:
            return _from_decimal(_deserializer.deserialize(item["passport"]))
        if "passport_gz" in item:
            return json.loads(gzip.decompress(item["passport_gz"]["B"]))
        uri = item["passport_uri"]["S"]
        try:
            doc = json.loads(storage.read_bytes(uri))
        except storage.StorageError:
            raise
        except (OSError, ValueError) as exc:
            raise storage.StorageError(f"passport {uri} named by the store could not be read: {exc}") from exc
        same = (
            isinstance(doc, dict)
            and doc.get("scan_id") == item["scan_id"]["S"]
            and (doc.get("model") or {}).get("key") == item["model_key"]["S"]
            and doc.get("created_at") == item["created_at"]["S"]
        )
        if not same:
            raise storage.StorageError(
                f"passport {uri} is not the one the store recorded (scan, model or created_at "
                "differ): another run overwrote it"
            )
        return doc

    def _query(self, **kwargs) -> Iterator[dict]:
        paginator = self._ddb.get_paginator("query")
        try:
            for page in paginator.paginate(TableName=self.table, **kwargs):
                yield from page["Items"]
        except ClientError as exc:
            raise self._error(exc) from exc

    def _item(self, scan_id: str, model_key: str) -> dict | None:
        key = {"scan_id": {"S": scan_id}, "model_key": {"S": model_key}}
        return self._call("get_item", Key=key, ConsistentRead=True).get("Item")

    def get(self, scan_id: str, model_key: str) -> dict | None:
        item = self._item(scan_id, model_key)
        return None if item is None else self._passport(item)

    def get_latest(self, scan_id: str) -> dict | None:
        items = list(
            self._query(
                KeyConditionExpression="scan_id = :s",
                ExpressionAttributeValues={":s": {"S": scan_id}},
                ConsistentRead=True,
            )
        )
        if not items:
            return None
        return self._passport(max(items, key=lambda i: (i["order_key"]["S"], i["model_key"]["S"])))

    def list_by_job(self, job_id: str) -> list[dict]:
        keys = self._query(
            IndexName=JOB_INDEX,
            KeyConditionExpression="job_id = :j",
            ExpressionAttributeValues={":j": {"S": job_id}},
        )
        ordered = sorted((k["scan_id"]["S"], k["model_key"]["S"]) for k in keys)
        items = (self._item(*key) for key in ordered)
        # The index lags the table: an item that has since moved to another job (or gone) is not this job's.
        return [self._passport(i) for i in items if i is not None and i["job_id"]["S"] == job_id]

    def status(self, scan_id: str, model_key: str) -> str | None:
        item = self._call(
            "get_item",
            Key={"scan_id": {"S": scan_id}, "model_key": {"S": model_key}},
            ConsistentRead=True,
            ProjectionExpression="#s",
            ExpressionAttributeNames={"#s": "status"},
        ).get("Item")
        return None if item is None else item["status"]["S"]

    def delete(self, scan_id: str, model_key: str) -> None:
        self._call("delete_item", Key={"scan_id": {"S": scan_id}, "model_key": {"S": model_key}})

    def statuses(self, scan_ids: list[str], model_key: str) -> dict[str, tuple[str, str | None]]:
        """``BatchGetItem`` of up to 100 keys per request, projected to the status and error code (a few bytes
        per item, strongly consistent like :meth:`status`)."""
        found: dict[str, tuple[str, str | None]] = {}
        unique = list(dict.fromkeys(scan_ids))
        for start in range(0, len(unique), BATCH_GET_KEYS):
            keys = [
                {"scan_id": {"S": s}, "model_key": {"S": model_key}} for s in unique[start : start + BATCH_GET_KEYS]
            ]
            for item in self._batch_get(keys):
                code = item.get("error_code", {}).get("S")
                found[item["scan_id"]["S"]] = (item["status"]["S"], code)
        return found

    def _batch_get(self, keys: list[dict]) -> Iterator[dict]:
        """Items of ``keys``, asking again for the ``UnprocessedKeys`` DynamoDB leaves when it throttles, with
        exponential backoff; a table that never answers them all is a :class:`StorageError`, not a partial plan."""
        request = {
            "Keys": keys,
            "ConsistentRead": True,
            "ProjectionExpression": "scan_id, #s, error_code",
            "ExpressionAttributeNames": {"#s": "status"},
        }
        for attempt in range(BATCH_GET_ATTEMPTS):
            try:
                answer = self._ddb.batch_get_item(RequestItems={self.table: request})
            except ClientError as exc:
                raise self._error(exc) from exc
            yield from answer.get("Responses", {}).get(self.table, [])
            left = answer.get("UnprocessedKeys", {}).get(self.table)
            if not left:
                return
            request = left
            time.sleep(min(5.0, 0.05 * 2**attempt))
        raise storage.StorageError(
            f"DynamoDB table {self.table!r} left {len(request['Keys'])} keys unread after {BATCH_GET_ATTEMPTS} tries"
        )


def create_table(name: str) -> None:
    """Create the passport table (on-demand billing) if absent and wait until it is active; idempotent.

    The job index projects the keys and :data:`INDEX_ATTRIBUTES` only, so each write copies about 100 bytes
    into it (one write unit) instead of the whole item. An existing table with a different key schema is an
    error rather than silently reused; an older table whose index projects ALL still works (it costs more:
    ``ray_app.ops.aws_setup.ensure_table`` reports the projection).
    """
    ddb = storage.client("dynamodb")
    key_schema = [
        {"AttributeName": "scan_id", "KeyType": "HASH"},
        {"AttributeName": "model_key", "KeyType": "RANGE"},
    ]
    try:
        ddb.create_table(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": n, "AttributeType": "S"} for n in ("scan_id", "model_key", "job_id")
            ],
            KeySchema=key_schema,
            GlobalSecondaryIndexes=[
                {
                    "IndexName": JOB_INDEX,
                    "KeySchema": [
                        {"AttributeName": "job_id", "KeyType": "HASH"},
                        {"AttributeName": "scan_id", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(INDEX_ATTRIBUTES)},
                }
            ],
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
        table = ddb.describe_table(TableName=name)["Table"]
        indexes = {i["IndexName"] for i in table.get("GlobalSecondaryIndexes", [])}
        if table["KeySchema"] != key_schema or JOB_INDEX not in indexes:
            raise storage.StorageError(f"DynamoDB table {name!r} exists with a different key schema") from exc
    ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 150})


# SQLite ------------------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS passports (
    scan_id TEXT NOT NULL,
    model_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    order_key TEXT NOT NULL,
    passport TEXT NOT NULL,
    PRIMARY KEY (scan_id, model_key)
);
CREATE INDEX IF NOT EXISTS passports_job_id ON passports (job_id);
"""

_SQLITE_PUT = """
INSERT INTO passports (scan_id, model_key, job_id, status, created_at, order_key, passport)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (scan_id, model_key) DO UPDATE SET
    job_id = excluded.job_id, status = excluded.status, created_at = excluded.created_at,
    order_key = excluded.order_key, passport = excluded.passport
WHERE excluded.order_key >= passports.order_key
"""


class SQLitePassportStore(PassportStore):
    """One local file (WAL mode, safe for several processes on one machine; not for network filesystems).

    The passport is stored as JSON text, so it comes back exactly as put.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SQLITE_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: sqlite3 connections must not cross threads, and opening one is cheap.
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def put(self, passport: dict, job_id: str, passport_uri: str | None = None) -> bool:
        """Keeps the whole passport (a local file costs nothing per byte); ``passport_uri`` is not needed."""
        rec = _Record(passport, job_id)
        row = (rec.scan_id, rec.model_key, rec.job_id, rec.status, rec.created_at, rec.order_key, rec.json)
        with self._db() as conn:
            return conn.execute(_SQLITE_PUT, row).rowcount == 1

    def _one(self, sql: str, args: tuple) -> dict | None:
        with self._db() as conn:
            row = conn.execute(sql, args).fetchone()
        return None if row is None else json.loads(row[0])

    def get(self, scan_id: str, model_key: str) -> dict | None:
        return self._one("SELECT passport FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key))

    def get_latest(self, scan_id: str) -> dict | None:
        return self._one(
            "SELECT passport FROM passports WHERE scan_id = ? ORDER BY order_key DESC, model_key DESC LIMIT 1",
            (scan_id,),
        )

    def list_by_job(self, job_id: str) -> list[dict]:
        with self._db() as conn:
            rows = conn.execute(
                "SELECT passport FROM passports WHERE job_id = ? ORDER BY scan_id, model_key", (job_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def status(self, scan_id: str, model_key: str) -> str | None:
        with self._db() as conn:
            row = conn.execute(
                "SELECT status FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key)
            ).fetchone()
        return None if row is None else row[0]

    def statuses(self, scan_ids: list[str], model_key: str) -> dict[str, tuple[str, str | None]]:
        """One ``SELECT ... IN (...)`` per 900 ids (under SQLite's oldest limit of 999 parameters)."""
        found: dict[str, tuple[str, str | None]] = {}
        unique = list(dict.fromkeys(scan_ids))
        with self._db() as conn:
            for start in range(0, len(unique), 900):
                chunk = unique[start : start + 900]
                rows = conn.execute(
                    "SELECT scan_id, status, json_extract(passport, '$.error.code') FROM passports "
                    f"WHERE model_key = ? AND scan_id IN ({','.join('?' * len(chunk))})",
                    (model_key, *chunk),
                )
                found.update((sid, (status, code)) for sid, status, code in rows)
        return found

    def delete(self, scan_id: str, model_key: str) -> None:
        with self._db() as conn:
            conn.execute("DELETE FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key))


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


# ----------------------------------------------------------------------------------------------- summary

#: One row per scan. Flat, Athena-friendly types; timestamps in milliseconds (Athena's safest Parquet form).
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string()),
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("model_key", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("input_uri", pa.string()),
        pa.field("mask_uri", pa.string()),
        pa.field("passport_uri", pa.string()),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        pa.field("read_s", pa.float64()),
        pa.field("segment_s", pa.float64()),
        pa.field("passport_s", pa.float64()),
        pa.field("write_s", pa.float64()),
        pa.field("total_s", pa.float64()),
        pa.field("structures_present", pa.int32()),
        pa.field("liver_ml", pa.float64()),
        pa.field("spleen_ml", pa.float64()),
        pa.field("kidney_left_ml", pa.float64()),
        pa.field("kidney_right_ml", pa.float64()),
        pa.field("pancreas_ml", pa.float64()),
        # What the scan used and wrote, for ``ray-app cost``: the segmentation actor's share of its node (CPUs
        # reserved and torch threads; GPUs) and the CPUs of the machine it ran on; every object written and
        # its bytes, those over LARGE_OBJECT_BYTES apart (the lifecycle rule moves them to Glacier IR); the
        # size of its DynamoDB item and of the item's copy in the job index (``dynamodb_item``).
        pa.field("actor_cpus", pa.float64()),
        pa.field("actor_gpus", pa.float64()),
        pa.field("node_cpus", pa.int32()),
        pa.field("objects_written", pa.int32()),
        pa.field("bytes_written", pa.int64()),
        pa.field("large_objects_written", pa.int32()),
        pa.field("large_bytes_written", pa.int64()),
        pa.field("store_item_bytes", pa.int32()),
        pa.field("store_index_bytes", pa.int32()),
    ]
)


def summary_table(rows: list[dict]) -> pa.Table:
    """Rows as a table with :data:`SUMMARY_SCHEMA`; missing columns are null, unknown ones an error."""
    names = set(SUMMARY_SCHEMA.names)
    clean = []
    for i, row in enumerate(rows):
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"summary row {i}: unknown columns {sorted(unknown)}")
        for required in ("scan_id", "status"):
            if row.get(required) is None:
                raise ValueError(f"summary row {i}: {required} is required")
        finished = row.get("finished_at")
        if isinstance(finished, str):
            row = {**row, "finished_at": datetime.fromisoformat(finished)}
        clean.append(row)
    try:
        return pa.Table.from_pylist(clean, schema=SUMMARY_SCHEMA)
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"summary rows do not fit the schema: {exc}") from exc


def write_summary(rows: list[dict], uri: str) -> str:
    """Write summary rows as one Parquet file (via :func:`storage.write_bytes`, so SSE applies)."""
    buf = io.BytesIO()
    pq.write_table(summary_table(rows), buf, compression="snappy")
    return storage.write_bytes(uri, buf.getvalue(), CONTENT_TYPES[".parquet"])


def summary_parts(uri: str) -> list[str]:
    """The Parquet files of a job summary: the one file an older job wrote at ``uri``, or the parts a batch job
    writes under ``uri/`` while it runs (``summary.parquet/<part>.parquet``, the layout Spark and Athena read
    as one table)."""
    if storage.exists(uri):
        return [uri]
    parts = [p for p in storage.list_uris(uri.rstrip("/") + "/") if p.endswith(".parquet")]
    if not parts:
        raise storage.ObjectNotFound(f"no job summary at {uri}")
    return parts


def clear_summary(uri: str) -> None:
    """Remove a job summary (the file or its parts), so that a job run again under its id writes a fresh one
    instead of adding parts to the last run's."""
    for found in storage.list_uris(uri):
        if found == uri or found.startswith(uri.rstrip("/") + "/"):
            storage.delete(found)


def read_summary_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A job summary (one file or its parts, local or s3://) as one table, optionally only some columns.

    ParquetFile, not ``pq.read_table``: read_table's dataset scanner leaves Arrow threads that abort the process
    at exit about half the time (apache/arrow#34314; 20 of 40 runs with pyarrow 26, 0 of 120 this way).
    """
    tables = [pq.ParquetFile(io.BytesIO(storage.read_bytes(p))).read(columns=columns) for p in summary_parts(uri)]
    return pa.concat_tables(tables, promote_options="default")


def read_summary(uri: str) -> list[dict]:
    """The rows of a job summary (local or s3://)."""
    return read_summary_table(uri).to_pylist()
