"""The passport index on DynamoDB: compact items (the indexed fields and the URI of the full ``passport.json``)
sized against DynamoDB's 400 KB item limit, a job index (GSI) for listing a job's scans, and the table's
creation."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from decimal import Decimal, DecimalException
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

from ray_app import storage
from ray_app.core.errors import PassportTooLarge
from ray_app.storage.passports import PassportRecord, PassportStore

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
    rec = PassportRecord(passport, job_id)
    item = {
        "scan_id": {"S": rec.scan_id},
        "model_key": {"S": rec.model_key},
        "job_id": {"S": rec.job_id},
        "status": {"S": rec.status},
        "created_at": {"S": rec.created_at},
        "order_key": {"S": rec.order_key},
    }
    error = passport.get("error")
    if not isinstance(error, dict):
        error = {}
    for attr, value in (("error_code", error.get("code")), ("error_message", error.get("message"))):
        if isinstance(value, str) and value:
            item[attr] = {"S": value}
    if passport_uri:
        item["passport_uri"] = {"S": passport_uri}
        model = _json_to_dynamo(passport["model"])
        if model is not None:
            item["model"] = model
        structures = passport.get("structures")
        if not isinstance(structures, dict):
            structures = {}
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

    def _error(self, exc: ClientError | BotoCoreError) -> storage.StorageError:
        if isinstance(exc, ClientError) and exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return storage.ObjectNotFound(f"DynamoDB table {self.table!r} does not exist")
        return storage.StorageError(f"DynamoDB table {self.table!r}: {exc}")

    def _call(self, method: str, **kwargs):
        try:
            return getattr(self._ddb, method)(TableName=self.table, **kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise
            raise self._error(exc) from exc
        except BotoCoreError as exc:
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
        except (ClientError, BotoCoreError) as exc:
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
        request: dict[str, Any] = {
            "Keys": keys,
            "ConsistentRead": True,
            "ProjectionExpression": "scan_id, #s, error_code",
            "ExpressionAttributeNames": {"#s": "status"},
        }
        for attempt in range(BATCH_GET_ATTEMPTS):
            try:
                answer = self._ddb.batch_get_item(RequestItems={self.table: request})
            except (ClientError, BotoCoreError) as exc:
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
