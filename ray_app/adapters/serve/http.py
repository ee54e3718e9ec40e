"""The HTTP surface of the Serve endpoint without Ray: request and response models (the passport's generated from
its JSON Schema), the error body and the statuses each route documents, and the request checks (token, URI,
body size) that run before a scan is touched."""

# No ``from __future__ import annotations``: FastAPI and pydantic read these annotations at run time.
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from ray_app import storage
from ray_app.core import passport
from ray_app.settings import Settings

#: Body content types and the scan kind each one declares (``None``: sniffed from the magic bytes).
BODY_KINDS: dict[str, str | None] = {
    "application/x-nifti": "nifti",
    "application/gzip": "nifti-gz",
    "application/x-gzip": "nifti-gz",
    "application/x-nifti-gz": "nifti-gz",
    "application/zip": "dicom-zip",
    "application/x-zip-compressed": "dicom-zip",
    "application/octet-stream": None,
}
JSON_BODY_LIMIT = 64 * 1024
MASK_TYPE = "application/gzip"
PNG_TYPE = "image/png"
ZIP_TYPE = "application/zip"
SERVE_JOB_PREFIX = "serve-"


# ---------------------------------------------------------------------------------------------- API models


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable name, e.g. unauthorized, truncated_file.")
    message: str


class ErrorBody(BaseModel):
    """Every error answer has this shape (except Serve's own backpressure 503, which is plain text)."""

    error: ErrorDetail


class UriRequest(BaseModel):
    """A scan already in S3: one object (NIfTI / .nii.gz / DICOM zip) or a prefix ending in ``/`` (a series)."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(max_length=2048, examples=["s3://scans/incoming/ct-0001.nii.gz"])
    scan_id: str | None = Field(default=None, description="Defaults to a random id (never derived from the key).")


def _json_type(prop: dict[str, Any], schema: dict[str, Any]) -> Any:
    """The Python type of a JSON Schema property, as precise as a response document needs (for OpenAPI)."""
    if "$ref" in prop:
        return _json_type(schema["$defs"][prop["$ref"].rsplit("/", 1)[1]], schema)
    if "const" in prop:
        return Literal[prop["const"]]
    if "enum" in prop:
        return Literal[tuple(prop["enum"])]
    kind = prop.get("type")
    if kind == "object":
        extra = prop.get("additionalProperties")
        value = _json_type(extra, schema) if isinstance(extra, dict) and extra else Any
        return dict[str, value]  # type: ignore[valid-type]  # a type built at run time
    if kind == "array":
        item = _json_type(prop.get("items", {}), schema)
        return list[item]  # type: ignore[valid-type]  # a type built at run time
    return {"string": str, "number": float, "integer": int, "boolean": bool}.get(str(kind), Any)


def passport_model() -> type[BaseModel]:
    """Serve's response model generated from the passport's JSON Schema (``ray_app/core/passport.schema.json``),
    the one source of the contract: same fields, same required ones, same status values."""
    schema = passport.passport_schema()
    required = set(schema["required"])
    fields: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        annotation, description = _json_type(prop, schema), prop.get("description")
        if name in required:
            fields[name] = (annotation, Field(description=description))
        else:
            fields[name] = (annotation | None, Field(default=None, description=description))
    return create_model(
        "Passport",
        __doc__="The anatomical passport (generated from ``ray_app/core/passport.schema.json``); returned verbatim.",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )


Passport = passport_model()


class Readiness(BaseModel):
    ready: bool
    models: list[str]
    error: str | None = None


class ApiError(Exception):
    """Raised anywhere in a request; answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


#: What each error status means, as the OpenAPI document says it. Statuses a route can answer are listed on that
#: route (``SEGMENT_ERRORS``, ``PASSPORT_ERRORS``); tests/test_serve.py checks every answer against the document.
ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request framing (bad_content_length).",
    401: "Missing or wrong bearer token (unauthorized).",
    403: "The uri is outside the allowed S3 prefixes (uri_not_allowed).",
    404: "Nothing stored under this id (passport_not_found).",
    413: "Body or scan over the configured limits (body_too_large, input_too_large).",
    415: "Unsupported Content-Type (unsupported_media_type).",
    422: "Unusable request or scan: invalid_request, invalid_id, invalid_roi_subset, object_not_found, or the scan's "
    "own error code (truncated_file, not_ct, ...). Not worth retrying unchanged.",
    500: "Unexpected error (internal_error); see the replica log.",
    501: "This deployment is not configured for it (persist_not_configured, passport_store_not_configured): a "
    "permanent state of the deployment, not worth retrying; ask its operator.",
    502: "S3 or the passport store failed (storage_error); retrying may help.",
    503: "Temporarily unable: model_loading, model_unavailable, out_of_memory, or Serve's own overload answer "
    "(plain text). Retry after `Retry-After` seconds when given.",
}
SEGMENT_ERRORS = (400, 401, 403, 413, 415, 422, 500, 501, 502, 503)
PASSPORT_ERRORS = (401, 404, 422, 500, 501, 502)
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def error_responses(statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}
    if 503 in out:  # Serve's proxy answers overload itself, in plain text
        out[503].update(content={"text/plain": {"schema": {"type": "string"}}}, headers=_RETRY_AFTER)
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
    return out


# ---------------------------------------------------------------------------------------------- helpers


def load_token(settings: Settings) -> str:
    """The bearer token from ``api_token`` or ``api_token_file``; refusing to run open is the safe default."""
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    if not token and settings.api_token_file:
        try:
            token = Path(settings.api_token_file).read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"cannot read RAY_APP_API_TOKEN_FILE: {type(exc).__name__}") from exc
    if not token:
        raise RuntimeError(
            "no API token: set RAY_APP_API_TOKEN (or RAY_APP_API_TOKEN_FILE) in the replicas' "
            "environment; the endpoint refuses to run unauthenticated"
        )
    if len(token) < 16:
        raise RuntimeError("the API token is shorter than 16 characters")
    return token


def check_uri_allowed(uri: str, prefixes: list[str]) -> str:
    """Only ``s3://`` objects under a configured prefix; anything else is 403 and never fetched."""
    try:
        loc = storage.parse_uri(uri)
    except storage.UnsupportedUri as exc:
        raise ApiError(403, "uri_not_allowed", f"only s3:// URIs are accepted ({exc.message})") from exc
    if loc.scheme != "s3":
        raise ApiError(403, "uri_not_allowed", "only s3:// URIs are accepted")
    parts = loc.key.split("/")
    if not loc.key or any(p in (".", "..") for p in parts) or "" in parts[:-1]:
        raise ApiError(403, "uri_not_allowed", "the S3 key is empty or has '.', '..' or empty segments")
    for prefix in prefixes:
        if not storage.is_s3(prefix):
            continue
        # A bare bucket prefix must not match a longer bucket name ("s3://scans" vs "s3://scans-other").
        bounded = prefix if prefix.endswith("/") or "/" in prefix[5:] else prefix + "/"
        if uri.startswith(bounded):
            return uri
    raise ApiError(403, "uri_not_allowed", "the URI is outside the buckets/prefixes this deployment may read")


def wants(request: Request, explicit: str | None) -> str:
    if explicit:
        return explicit
    accept = request.headers.get("accept", "")
    if MASK_TYPE in accept or "application/x-nifti-gz" in accept:
        return "mask"
    if PNG_TYPE in accept:
        return "preview"
    return "passport"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (header first, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise ApiError(400, "bad_content_length", "Content-Length is not a number") from exc
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body is {size} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
