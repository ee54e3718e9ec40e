"""Byte-level I/O for the two places results and inputs live: a local path or ``s3://bucket/key``.

Everything else (``file://``, ``http://``, ``gs://`` ...) is refused, so a URI taken from a manifest or a
request can never make a worker fetch from an arbitrary server. S3 goes through one cached boto3 client
per (service, endpoint, region) that uses botocore's own retry modes; there is no retry loop here.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# The storage errors are part of the one error model (code, HTTP status, retryable); re-exported from here.
from ray_app.core.errors import ObjectNotFound, ObjectTooLarge, StorageError, UnsupportedUri
from ray_app.settings import get_settings

#: botocore retries throttling and transient errors itself, with backoff and a retry quota.
RETRY_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=120)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``"s3"`` (with ``bucket`` and ``key``) or ``"local"`` (with ``path``)."""

    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""


def parse_uri(uri: str) -> Location:
    """Split a URI; refuse any scheme but ``s3://`` and plain local paths, and any control characters."""
    if not isinstance(uri, str) or not uri:
        raise UnsupportedUri(f"URI must be a non-empty string, got {uri!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise UnsupportedUri(f"URI contains control characters: {uri!r}")
    match = _SCHEME.match(uri)
    if match and len(match.group(1)) > 1:  # one letter would be a Windows drive, not a scheme
        if match.group(1).lower() != "s3" or not uri[3:].startswith("//"):
            raise UnsupportedUri(f"unsupported URI {uri!r}: only s3://bucket/key and local paths are allowed")
        bucket, _, key = uri[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise UnsupportedUri(f"invalid S3 bucket name in {uri!r}")
        return Location("s3", bucket=bucket, key=key)
    return Location("local", path=uri)


def is_s3(uri: str) -> bool:
    return parse_uri(uri).scheme == "s3"


@lru_cache(maxsize=8)
def _client(service: str, endpoint_url: str | None, region: str, pid: int):
    # ``pid`` keys the cache so a forked child never reuses its parent's connection pool.
    return boto3.session.Session().client(service, endpoint_url=endpoint_url, region_name=region, config=RETRY_CONFIG)


DEFAULT_REGION = "us-east-1"


@lru_cache(maxsize=1)
def _boto_region() -> str | None:
    return boto3.session.Session().region_name


def aws_region() -> tuple[str, str]:
    """The region every client uses, and where it came from (preflight names it in its errors):
    ``RAY_APP_AWS_REGION``, else ``AWS_REGION`` (the AWS CLI's and most SDKs' variable, which boto3 ignores), else
    boto3's own chain (``AWS_DEFAULT_REGION``, the profile's region), else us-east-1."""
    settings = get_settings()
    if settings.aws_region:
        return settings.aws_region, "RAY_APP_AWS_REGION"
    if os.environ.get("AWS_REGION"):
        return os.environ["AWS_REGION"], "AWS_REGION"
    found = _boto_region()
    if found:
        return found, "AWS_DEFAULT_REGION / the AWS profile"
    return DEFAULT_REGION, "the default"


def client(service: str = "s3"):
    """A cached boto3 client in :func:`aws_region`; the endpoint is ``settings.aws_endpoint_url``, else boto3's own
    ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>`` handling applies."""
    return _client(service, get_settings().aws_endpoint_url, aws_region()[0], os.getpid())


def clear_client_cache() -> None:
    """Forget cached clients (and settings), e.g. after tests change the endpoint in the environment."""
    _client.cache_clear()
    _boto_region.cache_clear()
    get_settings.cache_clear()


def _s3_object(uri: str) -> Location:
    loc = parse_uri(uri)
    if loc.scheme == "s3" and (not loc.key or loc.key.endswith("/")):
        raise UnsupportedUri(f"{uri!r} names a prefix, not an object")
    return loc


#: What a call to AWS raises: an answer with an error (ClientError), or none at all (BotoCoreError: an endpoint
#: that cannot be reached, no credentials, a timeout), each turned into the caller's StorageError.
AWS_ERRORS = (ClientError, BotoCoreError)


def _is_not_found(exc: Exception) -> bool:
    if not isinstance(exc, ClientError):
        return False
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return err.get("Code") in _NOT_FOUND_CODES or status == 404


def _too_large(uri: str, size: int, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{uri} is {size} bytes, more than the allowed {max_bytes}")


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole object; with ``max_bytes``, refuse a larger one from its HEAD/stat size, before reading."""
    loc = _s3_object(uri)
    if loc.scheme == "local":
        try:
            with open(loc.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(uri, size, max_bytes)
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no such file: {uri}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from exc
        if max_bytes is not None and len(data) > max_bytes:  # grew after stat
            raise _too_large(uri, len(data), max_bytes)
        return data

    s3 = client("s3")
    try:
        head = s3.head_object(Bucket=loc.bucket, Key=loc.key)
        size = head["ContentLength"]
        if max_bytes is not None and size > max_bytes:
            raise _too_large(uri, size, max_bytes)
        # IfMatch pins the GET to the version whose size was checked.
        body = s3.get_object(Bucket=loc.bucket, Key=loc.key, IfMatch=head["ETag"])["Body"]
        with body:
            return body.read()
    except AWS_ERRORS as exc:
        if _is_not_found(exc):
            raise ObjectNotFound(f"no such object: {uri}") from exc
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> str:
    """Write a whole object atomically and return its URI.

    S3: one PUT (atomic by nature) that always requests server-side encryption (``settings.s3_sse``).
    Local: a temp file in the same directory, fsynced, then ``os.replace``; readers see the old file or the
    new one, never a partial one. The file keeps ``mkstemp``'s owner-only mode (0600): results are patient data.
    """
    loc = _s3_object(uri)
    if loc.scheme == "s3":
        extra = {"ContentType": content_type} if content_type else {}
        try:
            client("s3").put_object(
                Bucket=loc.bucket, Key=loc.key, Body=data, ServerSideEncryption=get_settings().s3_sse, **extra
            )
        except AWS_ERRORS as exc:
            raise StorageError(f"cannot write {uri}: {exc}") from exc
        return uri

    target = Path(loc.path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from exc
    return uri


def list_uris(prefix_uri: str) -> list[str]:
    """All object URIs under a prefix, sorted.

    S3 prefixes are plain key prefixes (end one with ``/`` to mean a folder). Locally a directory lists every
    file below it, and any other path acts as a prefix within its parent directory, like S3.
    """
    loc = parse_uri(prefix_uri)
    if loc.scheme == "s3":
        out: list[str] = []
        try:
            for page in client("s3").get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
                out.extend(f"s3://{loc.bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        except AWS_ERRORS as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"no such bucket: {prefix_uri}") from exc
            raise StorageError(f"cannot list {prefix_uri}: {exc}") from exc
        return sorted(out)

    is_dir = os.path.isdir(loc.path)
    root = loc.path if is_dir else (os.path.dirname(loc.path) or ".")
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if root == "." and not is_dir:
                path = os.path.relpath(path)
            if is_dir or path.startswith(loc.path):
                found.append(path)
    return sorted(found)


def exists(uri: str) -> bool:
    loc = _s3_object(uri)
    if loc.scheme == "local":
        return os.path.isfile(loc.path)
    try:
        client("s3").head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except AWS_ERRORS as exc:
        if _is_not_found(exc):
            return False
        raise StorageError(f"cannot check {uri}: {exc}") from exc


def delete(uri: str) -> None:
    """Remove an object; removing one that is already gone is not an error."""
    loc = _s3_object(uri)
    if loc.scheme == "local":
        try:
            Path(loc.path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
        return
    try:
        client("s3").delete_object(Bucket=loc.bucket, Key=loc.key)
    except AWS_ERRORS as exc:
        if not _is_not_found(exc):
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
