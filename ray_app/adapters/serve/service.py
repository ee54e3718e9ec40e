"""The Serve deployment: the FastAPI app (error handlers, offline API docs), the replica class that owns its
models, and the application builder. The HTTP models and request checks are in :mod:`.http`."""

# No ``from __future__ import annotations``: Serve rebuilds the route signatures of the ingress class and
# FastAPI must see real types there (with strings it takes ``request: Request`` for a query parameter).
import asyncio
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app import storage
from ray_app.adapters.serve.http import (
    BODY_KINDS,
    JSON_BODY_LIMIT,
    MASK_TYPE,
    PASSPORT_ERRORS,
    PNG_TYPE,
    SEGMENT_ERRORS,
    SERVE_JOB_PREFIX,
    ZIP_TYPE,
    ApiError,
    Passport,
    Readiness,
    UriRequest,
    check_uri_allowed,
    error_response,
    error_responses,
    load_token,
    read_body,
    wants,
)
from ray_app.core import errors, outputs, pipeline
from ray_app.settings import Settings, get_settings
from ray_app.storage import results
from ray_app.storage.keys import InvalidId, validate_scan_id

logger = logging.getLogger("ray.serve")


api = FastAPI(
    title="ray_app segmentation",
    version="1.0",
    description="TotalSegmentator CT segmentation: POST a scan, get its anatomical passport (or mask / preview).",
    # Swagger UI is served from the installed package below, not from a public CDN: on a network without
    # internet access FastAPI's default page stays blank. ReDoc has no packaged copy, so it is off.
    docs_url=None,
    redoc_url=None,
)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return error_response(422, "invalid_request", "; ".join(parts)[:2000])


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error: %s", type(exc).__name__)
    return error_response(500, "internal_error", "internal error; see the replica log")


# ---------------------------------------------------------------------------------------------- API docs

DOCS_ASSETS = "/docs/assets"
#: The Swagger UI files the page needs, from the ``swagger-ui-bundle-v2`` package (nothing else is served).
SWAGGER_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def _swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


@api.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI for this API, every asset from this server (works offline)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{api.openapi_url}",
        title=f"{api.title} - API docs",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
    )


@api.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
async def docs_asset(name: str) -> FileResponse:
    media_type = SWAGGER_ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "no such docs asset")
    return FileResponse(
        _swagger_dir() / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )


# ---------------------------------------------------------------------------------------------- deployment


@serve.deployment(name="SegmentService", graceful_shutdown_timeout_s=120, health_check_period_s=10)
@serve.ingress(api)
class SegmentService:
    """One replica: the default model loads in the background at start (``/readyz`` says when), other modes and
    ROI subsets load on first use into a small LRU (``serve_extra_models``)."""

    def __init__(self, settings_overrides: dict[str, Any] | None = None):
        from ray.util import metrics

        from ray_app.core.totalseg import task_spec

        self.settings = Settings(**(settings_overrides or {}))
        self._token = load_token(self.settings).encode()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="segment")
        self._io = ThreadPoolExecutor(2, thread_name_prefix="scan-io")
        self._default_key = task_spec("total", fast=self.settings.fast).key
        self._extra: OrderedDict[str, Any] = OrderedDict()
        self._store: Any = None  # a PassportStore, opened on first use
        self._default: Future = self._compute.submit(self._load_default)
        self.scans = metrics.Counter(
            "ray_app_serve_scans", "Scans segmented by the Serve endpoint.", tag_keys=("model_key", "status")
        )
        self.failures = metrics.Counter(
            "ray_app_serve_failures", "Segment requests that produced no passport.", tag_keys=("code",)
        )
        self.seconds = metrics.Histogram(
            "ray_app_serve_segment_seconds",
            "Model time per scan.",
            boundaries=[1, 2, 5, 10, 20, 40, 80, 160, 320],
            tag_keys=("model_key",),
        )

    # -- models (compute thread only) -------------------------------------------------------------------

    def _load_default(self):
        from ray_app.core.segmenter import Segmenter

        t = time.perf_counter()
        seg = Segmenter.from_settings(self.settings)
        logger.info("model %s loaded in %.1f s", seg.spec.key, time.perf_counter() - t)
        return seg

    def _segmenter(self, spec):
        from ray_app.core.segmenter import Segmenter

        if spec.key == self._default_key:
            return self._default.result()
        seg = self._extra.pop(spec.key, None)
        if seg is None:
            t = time.perf_counter()
            seg = Segmenter.from_settings(self.settings, spec)
            logger.info("model %s loaded in %.1f s", spec.key, time.perf_counter() - t)
        self._extra[spec.key] = seg
        while len(self._extra) > self.settings.serve_extra_models:
            self._extra.popitem(last=False)
        return seg

    def _segment(self, spec, scan, timings):
        seg = self._segmenter(spec)
        return pipeline.segment_scan(seg, scan, settings=self.settings, timings=timings), seg

    # -- health -----------------------------------------------------------------------------------------

    def check_health(self):
        """Serve replaces a replica whose default model failed to load."""
        failed = self._default.exception() if self._default.done() else None
        if failed is not None:
            raise RuntimeError(f"model load failed: {errors.describe(failed).code}")

    @api.get("/healthz", summary="Liveness: the replica answers (no model needed)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        summary="Readiness: 200 once the default model is loaded, 503 before (or if it failed)",
    )
    async def readyz(self):
        models = [self._default_key] if self._default.done() and not self._default.exception() else []
        models += list(self._extra)
        if not self._default.done():
            return JSONResponse(
                Readiness(ready=False, models=models).model_dump(),
                status_code=503,
                headers={"Retry-After": str(self.settings.serve_retry_after_s)},
            )
        failed = self._default.exception()
        if failed is not None:
            code = errors.describe(failed).code
            return JSONResponse(Readiness(ready=False, models=models, error=code).model_dump(), status_code=503)
        return Readiness(ready=True, models=models)

    # -- auth -------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer <token>' header is required",
                {"WWW-Authenticate": "Bearer"},
            )

    # -- routes -----------------------------------------------------------------------------------------

    @api.post(
        "/v1/segment",
        summary="Segment one scan; returns its passport (or the mask / a preview)",
        responses={
            200: {"model": Passport, "content": {MASK_TYPE: {}, PNG_TYPE: {}, ZIP_TYPE: {}}},
            **error_responses(SEGMENT_ERRORS),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": UriRequest.model_json_schema()},
                    **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in BODY_KINDS},
                },
            }
        },
    )
    async def segment(
        self,
        request: Request,
        mode: Annotated[
            Literal["fast", "normal"] | None,
            Query(description="fast: 3 mm model; normal: 1.5 mm (default: the deployment's)."),
        ] = None,
        roi_subset: Annotated[
            list[str] | None, Query(description="Structures to segment (repeat or comma-separate).")
        ] = None,
        persist: Annotated[bool, Query(description="Store mask and passport; locations in `outputs`.")] = False,
        return_: Annotated[
            Literal["passport", "mask", "preview", "segmentations"] | None,
            Query(
                alias="return",
                description="Default passport; `Accept: application/gzip` also asks for the mask; "
                "`segmentations`: a zip of one binary NIfTI per structure present (TotalSegmentator's default "
                "layout).",
            ),
        ] = None,
        scan_id: Annotated[str | None, Query(description="Id for an uploaded scan (default: random).")] = None,
    ):
        self._authorize(request)
        start = time.perf_counter()
        spec = self._spec(mode, roi_subset)
        want = wants(request, return_)
        if persist and not (self.settings.output_prefix and self.settings.passport_store):
            raise ApiError(
                501, "persist_not_configured", "this deployment has no output_prefix/passport_store to persist to"
            )
        sid, load = await self._scan_source(request, scan_id)
        result, seg = await self._run(sid, spec, load, persist, start)
        self._record(sid, spec, result.passport, start)
        return await self._answer(want, sid, spec, result, seg)

    async def _scan_source(self, request: Request, scan_id: str | None) -> tuple[str, Callable[[], Any]]:
        """The scan's id and how to load it: from a JSON ``{"uri": ...}`` body or from the body's bytes."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = await read_body(request, JSON_BODY_LIMIT)
            try:
                req = UriRequest.model_validate_json(body)
            except ValidationError as exc:
                raise ApiError(
                    422,
                    "invalid_request",
                    "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:2000],
                ) from exc
            if scan_id and req.scan_id and scan_id != req.scan_id:
                raise ApiError(422, "invalid_request", "scan_id differs between the query and the body")
            uri = check_uri_allowed(req.uri, self.settings.allowed_uri_prefixes)
            sid = self._scan_id(req.scan_id or scan_id)
            return sid, self._load_uri(uri, sid)
        if content_type in BODY_KINDS:
            sid = self._scan_id(scan_id)
            data = await read_body(request, self.settings.max_body_bytes)
            return sid, self._load_bytes(data, sid, BODY_KINDS[content_type])
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json or one of: {', '.join(BODY_KINDS)}",
        )

    async def _run(self, sid: str, spec, load: Callable[[], Any], persist: bool, start: float):
        """Load, segment and (``persist``) store the scan; every failure becomes an :class:`ApiError`."""
        loop = asyncio.get_running_loop()
        try:
            scan = await loop.run_in_executor(self._io, load)
            read_s = time.perf_counter() - start
            await self._wait_for_model()
            result, seg = await loop.run_in_executor(self._compute, self._segment, spec, scan, {"read_s": read_s})
            if result.passport["status"] == "failed":
                err = result.passport["error"]
                raise errors.from_code(err["code"], err["message"], scan_id=sid)
            if persist:
                await loop.run_in_executor(self._io, self._persist, result, seg)
            return result, seg
        except ApiError as exc:
            self.failures.inc(tags={"code": exc.code})
            logger.warning(
                "segment scan_id=%s model=%s rejected code=%s after %.2f s",
                sid,
                spec.key,
                exc.code,
                time.perf_counter() - start,
            )
            raise
        except Exception as exc:
            raise self._failure(exc, sid, spec) from exc

    def _failure(self, exc: BaseException, sid: str, spec) -> ApiError:
        """The answer to a failed scan, from the error model (:func:`ray_app.core.errors.describe`). Call it in an
        ``except`` block: an unexpected error is logged with its traceback and answered without its text."""
        info = errors.describe(exc)
        self.failures.inc(tags={"code": info.code})
        if info.code == errors.InternalError.code:
            logger.exception("segment scan_id=%s model=%s internal error", sid, spec.key)
            return ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); see the replica log")
        logger.warning("segment scan_id=%s model=%s failed code=%s", sid, spec.key, info.code)
        retry = {"Retry-After": str(self.settings.serve_retry_after_s)} if info.http_status == 503 else None
        return ApiError(info.http_status, info.code, info.message, retry)

    def _record(self, sid: str, spec, doc: dict[str, Any], start: float) -> None:
        """Metrics and the log line of a scan answered with its passport."""
        timings = doc["timings"]
        self.scans.inc(tags={"model_key": spec.key, "status": doc["status"]})
        self.seconds.observe(timings.get("segment_s", 0.0), tags={"model_key": spec.key})
        logger.info(
            "segment scan_id=%s model=%s status=%s read_s=%.2f segment_s=%.2f total_s=%.2f",
            sid,
            spec.key,
            doc["status"],
            timings.get("read_s", 0.0),
            timings.get("segment_s", 0.0),
            time.perf_counter() - start,
        )

    async def _answer(self, want: str, sid: str, spec, result, seg) -> Response:
        """The passport as JSON, or the mask / per-structure zip / preview it asked for."""
        loop = asyncio.get_running_loop()
        doc = result.passport
        headers = {"X-Scan-Id": sid, "X-Model-Key": spec.key, "X-Passport-Status": doc["status"]}
        if result.locations.get("passport"):
            headers["X-Passport-Uri"] = result.locations["passport"]
        if want == "mask":
            data = await loop.run_in_executor(self._io, outputs.mask_to_nifti_bytes, result.mask, result.scan)
            headers["Content-Disposition"] = f'attachment; filename="{sid}.mask.nii.gz"'
            return Response(data, media_type=MASK_TYPE, headers=headers)
        if want == "segmentations":
            data = await loop.run_in_executor(
                self._io, outputs.per_structure_zip, result.mask, result.scan, seg.spec.output_labels
            )
            headers["Content-Disposition"] = f'attachment; filename="{sid}.{outputs.SEGMENTATIONS_ZIP}"'
            return Response(data, media_type=ZIP_TYPE, headers=headers)
        if want == "preview":
            data = await loop.run_in_executor(
                self._io, outputs.preview_png, result.scan, result.mask, seg.spec.output_labels
            )
            return Response(data, media_type=PNG_TYPE, headers=headers)
        return JSONResponse(doc, headers=headers)

    @api.get(
        "/v1/passports/{scan_id}",
        summary="The latest stored passport of a scan",
        responses={200: {"model": Passport}, **error_responses(PASSPORT_ERRORS)},
    )
    async def get_passport(
        self,
        request: Request,
        scan_id: Annotated[str, PathParam(max_length=128)],
        model_key: Annotated[
            str | None, Query(description="e.g. total_fast; default: the newest of any model.")
        ] = None,
    ):
        self._authorize(request)
        sid = self._scan_id(scan_id)
        store = self._passports()
        if store is None:
            # Permanent for this deployment (not 503, which says "retry later"): nothing to retry.
            raise ApiError(501, "passport_store_not_configured", "this deployment has no passport_store")
        loop = asyncio.get_running_loop()
        try:
            doc = await loop.run_in_executor(
                self._io, (lambda: store.get(sid, model_key)) if model_key else (lambda: store.get_latest(sid))
            )
        except InvalidId as exc:
            raise ApiError(422, exc.code, exc.message) from exc
        except storage.StorageError as exc:
            raise ApiError(502, exc.code, "the passport store could not be read") from exc
        if doc is None:
            raise ApiError(404, "passport_not_found", f"no passport stored for scan {sid}")
        return JSONResponse(doc)

    # -- request pieces ---------------------------------------------------------------------------------

    def _spec(self, mode: str | None, roi_subset: list[str] | None):
        from ray_app.core.totalseg import task_spec

        rois = sorted({r.strip() for item in roi_subset or () for r in item.split(",") if r.strip()}) or None
        fast = self.settings.fast if mode is None else mode == "fast"
        try:
            return task_spec("total", fast=fast, roi_subset=rois)
        except errors.RayAppError as exc:
            raise ApiError(422, "invalid_roi_subset", exc.message) from exc

    @staticmethod
    def _scan_id(value: str | None) -> str:
        if value is None:
            return f"scan-{uuid.uuid4().hex[:16]}"
        try:
            return validate_scan_id(value)
        except InvalidId as exc:
            raise ApiError(422, exc.code, exc.message) from exc

    def _load_bytes(self, data: bytes, sid: str, kind: str | None):
        from ray_app.core.scan import load_bytes

        return lambda: load_bytes(data, sid, kind=kind, settings=self.settings)

    def _load_uri(self, uri: str, sid: str):
        from ray_app.storage.scans import load_scan

        return lambda: load_scan(uri, sid, self.settings)

    async def _wait_for_model(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._default)), self.settings.serve_model_wait_s)
        except asyncio.TimeoutError as exc:
            raise ApiError(
                503,
                "model_loading",
                "the model is still loading; retry later",
                {"Retry-After": str(self.settings.serve_retry_after_s)},
            ) from exc
        except Exception as exc:
            raise ApiError(
                503, "model_unavailable", f"the model could not be loaded ({errors.describe(exc).code})"
            ) from exc

    def _passports(self):
        from ray_app.storage.sinks import open_passport_store

        if self._store is None and self.settings.passport_store:
            self._store = open_passport_store(self.settings.passport_store)
        return self._store

    def _persist(self, result, seg) -> None:
        from ray_app.storage.sinks import ArtifactSink

        job_id = SERVE_JOB_PREFIX + time.strftime("%Y%m%d", time.gmtime())
        results.write_result(
            result,
            ArtifactSink(str(self.settings.output_prefix)),  # persist is refused without one
            self._passports(),
            job_id,
            label_map=seg.spec.output_labels,
        )


# ---------------------------------------------------------------------------------------------- builder


class AppArgs(BaseModel):
    """Builder arguments (``serve run ray_app.adapters.serve:app key=value`` or ``args:`` in ``serve_config.yaml``).

    Unset deployment knobs fall back to the ``RAY_APP_SERVE_*`` settings. ``settings`` overrides replica
    settings (e.g. ``allowed_uri_prefixes``, ``output_prefix``); the token is refused here because builder args
    end up in Serve's stored config: pass it through the environment or ``api_token_file``.
    """

    model_config = ConfigDict(extra="forbid")
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    max_queued_requests: int | None = Field(default=None, ge=-1)
    retry_after_s: int | None = Field(default=None, ge=0)
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 300.0
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("settings")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "api_token" in value:
            raise ValueError("do not pass api_token as an argument; use RAY_APP_API_TOKEN or api_token_file")
        Settings(**value)  # fail at build time, not in every replica
        return value


def _pick(value, default):
    return default if value is None else value


def build_app(args: AppArgs | dict[str, Any] | None = None) -> serve.Application:
    """The application with its autoscaling and backpressure options resolved."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    s = get_settings()
    min_r, max_r = _pick(a.min_replicas, s.serve_min_replicas), _pick(a.max_replicas, s.serve_max_replicas)
    if min_r > max_r:
        raise ValueError(f"min_replicas {min_r} > max_replicas {max_r}")
    device = a.settings.get("device", s.device)
    num_gpus = _pick(a.num_gpus, s.serve_gpus_per_replica or (1.0 if device == "cuda" else 0.0))
    if device == "cuda" and num_gpus <= 0:  # the replica would see no GPU and fail to load its model
        raise ValueError(
            "device cuda needs a GPU per replica: leave num_gpus unset (default 1 with cuda) or give a share"
        )
    return SegmentService.options(  # type: ignore[attr-defined]  # added by @serve.deployment
        autoscaling_config={
            "min_replicas": min_r,
            "max_replicas": max_r,
            "initial_replicas": min_r,
            "target_ongoing_requests": _pick(a.target_ongoing_requests, s.serve_target_ongoing_requests),
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        },
        max_ongoing_requests=_pick(a.max_ongoing_requests, s.serve_max_ongoing_requests),
        max_queued_requests=_pick(a.max_queued_requests, s.serve_max_queued_requests),
        backpressure_config={"status_code": 503, "retry_after_s": _pick(a.retry_after_s, s.serve_retry_after_s)},
        ray_actor_options={"num_cpus": _pick(a.num_cpus, s.serve_cpus_per_replica), "num_gpus": num_gpus},
    ).bind(a.settings)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run ray_app.adapters.serve:app`` and ``import_path`` in serve_config.yaml."""
    return build_app(args)
