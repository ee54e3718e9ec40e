"""The Serve endpoint over real HTTP on 127.0.0.1: passports equal to the in-process pipeline's for NIfTI, DICOM
zip and S3 inputs, persistence to S3 + DynamoDB (moto server), every refusal as a JSON error, backpressure as
503 + Retry-After, and ``serve deploy`` of the repo's config onto a separate ``ray start --head`` cluster."""

from __future__ import annotations

import ast
import gzip
import inspect
import io
import re
import secrets
import shutil
import subprocess
import textwrap
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from ray_app.adapters import serve as serve_app
from ray_app.adapters.serve import ApiError, check_uri_allowed, load_token
from ray_app.core import errors, pipeline
from ray_app.demo.phantom import make_phantom
from ray_app.settings import Settings
from ray_app.storage.sinks import create_table, open_passport_store
from tests._ray import RAY_BIN, free_port, ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL = "total_fast"
TOKEN = secrets.token_urlsafe(24)
MAX_BODY = 4 * 1024**2
RETRY_AFTER = 7
#: One replica, one request in it, one waiting: the third concurrent request must be refused.
CAPACITY = 1 * 1 + 1


def _gz_nifti(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(nib.Nifti1Image(img.get_fdata().astype("int16"), img.affine).to_bytes(), compresslevel=1)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_OPENAPI: dict[str, dict] = {}


def _documented(r: httpx.Response) -> dict | None:
    """The OpenAPI operation that answered ``r`` (from the serving app's own document), or None for a path that
    is no operation (e.g. an unknown URL)."""
    base = f"{r.request.url.scheme}://{r.request.url.netloc.decode()}"
    if base not in _OPENAPI:
        _OPENAPI[base] = httpx.get(f"{base}/openapi.json", timeout=60).json()
    for template, ops in _OPENAPI[base]["paths"].items():
        if re.fullmatch(re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)), r.request.url.path):
            return ops.get(r.request.method.lower())
    return None


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """A JSON error with ``status`` and ``code``, whose status the route's OpenAPI entry lists with ErrorBody."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code, err
    op = _documented(r)
    if op is not None:
        documented = op["responses"].get(str(status))
        assert documented, f"{r.request.method} {r.request.url.path} answered {status}, not in its OpenAPI entry"
        assert documented["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    return err


@pytest.fixture(scope="module")
def scans(example_dir) -> dict[str, bytes]:
    """A small phantom as .nii.gz, the real DICOM series zipped in memory, and a truncated .nii.gz."""
    dicom = io.BytesIO()
    with zipfile.ZipFile(dicom, "w") as z:
        for f in sorted((example_dir / "example_ct_dicom").iterdir()):
            z.write(f, f"series/{f.name}")
    # An abdominal crop of phantom 7 that fits one network tile at 3 mm: seconds per request, 26 structures.
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-142.5, -118.5, -133.5)
    phantom = _gz_nifti(make_phantom(7, affine=affine, shape=(96, 80, 80))[0])
    return {"phantom": phantom, "dicom": dicom.getvalue(), "corrupt": phantom[: len(phantom) // 3]}


@pytest.fixture(scope="module")
def reference(phantom_weights, scans) -> dict[str, dict]:
    """What the in-process pipeline (the batch job's code path) computes for the same bytes."""
    from ray_app.core.scan import load_bytes
    from ray_app.core.segmenter import Segmenter

    # num_threads: the replica's thread count (num_cpus=1): same float sums
    segmenter = Segmenter(fast=True, num_threads=1, settings=Settings())
    out = {}
    for name, kind in (("phantom", "nifti-gz"), ("dicom", "dicom-zip")):
        result = pipeline.segment_scan(segmenter, load_bytes(scans[name], name, kind=kind, settings=Settings()))
        assert result.ok, result.passport
        out[name] = result.passport
    return out


@pytest.fixture(scope="module")
def aws(moto_server):
    s3 = boto3.client("s3")
    bucket = f"serve-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=f"{bucket}-other")
    table = f"passports-{uuid.uuid4().hex[:10]}"
    create_table(table)
    yield {"s3": s3, "bucket": bucket, "table": table}
    boto3.client("dynamodb").delete_table(TableName=table)


@pytest.fixture(scope="module")
def service(ray_cluster, aws, tmp_path_factory):
    """The app on the session's Ray, at one replica with capacity 2, the token read from a 0600 secret file."""
    from ray import serve

    from ray_app.adapters.serve import build_app

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    bucket = aws["bucket"]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app(
                {
                    "min_replicas": 1,
                    "max_replicas": 1,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                    "retry_after_s": RETRY_AFTER,
                    "num_cpus": 1,
                    "settings": {
                        "api_token_file": str(token_file),
                        "allowed_uri_prefixes": [f"s3://{bucket}/in/"],
                        "output_prefix": f"s3://{bucket}/out",
                        "passport_store": f"dynamodb://{aws['table']}",
                        "max_body_bytes": MAX_BODY,
                        "download_weights": False,
                    },
                }
            ),
            name="ray-app",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=300) as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load within 120 s"
                time.sleep(0.5)
            yield {"url": url, "client": client, **aws}
    finally:
        serve.shutdown()  # frees the replica's CPU for the modules that run after this one


def _segment(client: httpx.Client, body: bytes, content_type: str, **params) -> httpx.Response:
    return client.post("/v1/segment", content=body, params=params, headers={**_auth(), "Content-Type": content_type})


def _same_result(served: dict, expected: dict) -> None:
    assert served["status"] == expected["status"] == "ok"
    assert any(s["present"] for s in served["structures"].values())
    assert served["structures"] == expected["structures"]
    assert served["model"] == expected["model"]
    for key in ("shape", "spacing_mm", "affine", "orientation", "hu_range", "dicom"):
        assert served["scan"][key] == expected["scan"][key], key


# ------------------------------------------------------------------------------------------------- no Ray


def test_token_is_required_and_may_come_from_a_secret_file(tmp_path):
    with pytest.raises(RuntimeError, match="RAY_APP_API_TOKEN"):
        load_token(Settings(api_token=None, api_token_file=None))
    with pytest.raises(RuntimeError, match="shorter"):
        load_token(Settings(api_token="short"))
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert load_token(Settings(api_token=None, api_token_file=str(secret))) == TOKEN


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
        "/etc/passwd",
        "s3://other/in/a.nii.gz",
        "s3://scans-evil/in/a.nii.gz",
        "s3://scans/private/a.nii.gz",
        "s3://scans/in/../private/a.nii.gz",
        "s3://scans/in//a.nii.gz",
        "S3://scans/in/a.nii.gz",
        "gs://scans/in/a.nii.gz",
        "s3://scans",
    ],
)
def test_uris_outside_the_allowed_prefixes_are_refused(uri):
    with pytest.raises(ApiError) as info:
        check_uri_allowed(uri, ["s3://scans/in/", "s3://scans-other", "/etc"])
    assert info.value.status == 403


def test_the_response_model_is_the_passport_schema_field_by_field():
    """One contract: Serve's ``Passport`` has exactly the schema's fields, the same required ones and the same
    status values (no ``flagged``, which nothing produces), and takes the documents the core writes."""
    import typing

    from ray_app.core.passport import failure_passport, passport_schema

    schema = passport_schema()
    fields = serve_app.Passport.model_fields
    assert set(fields) == set(schema["properties"])
    assert {n for n, f in fields.items() if f.is_required()} == set(schema["required"])
    assert set(typing.get_args(fields["status"].annotation)) == set(schema["properties"]["status"]["enum"])
    assert typing.get_args(fields["schema_version"].annotation) == (schema["properties"]["schema_version"]["const"],)
    assert serve_app.Passport.model_config["extra"] == "forbid" and schema["additionalProperties"] is False
    doc = failure_passport("s-1", code="truncated_file", message="the file ends early", model={"task": "total"})
    assert serve_app.Passport.model_validate(doc).status == "failed"
    with pytest.raises(ValidationError):
        serve_app.Passport.model_validate({**doc, "status": "flagged"})
    with pytest.raises(ValidationError):
        serve_app.Passport.model_validate({**doc, "surprise": 1})


_SERVICE = serve_app.SegmentService.func_or_class  # the class behind the Serve deployment


def _raised_statuses(fn, seen: set | None = None) -> set[int]:
    """Statuses ``fn`` can answer: ``ApiError(<status>, ...)`` in its body and, through the serve package's
    functions and methods it calls (``self._x``, ``x``), in theirs; ``ApiError(info.http_status, ...)`` counts
    as every status of the error model (``ray_app.core.errors``: each class's ``http_status``)."""
    seen = set() if seen is None else seen
    if fn.__name__ in seen:
        return set()
    seen.add(fn.__name__)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "ApiError":
                if isinstance(node.args[0], ast.Constant):
                    out.add(node.args[0].value)
                else:  # ApiError(errors.describe(exc).http_status, ...)
                    out |= {cls.http_status for cls in errors.error_classes()}
            elif name:
                target = getattr(_SERVICE, name, None) or fn.__globals__.get(name)
                if inspect.isfunction(target) and target.__module__.startswith(serve_app.__name__ + "."):
                    out |= _raised_statuses(target, seen)
    return out


def test_the_openapi_document_lists_every_status_each_route_can_answer():
    """Walk the routes' code for every status they can raise (the error paths) and the app's OpenAPI document for
    what it promises: they must agree, each error with the ErrorBody schema, and 503 also as Serve's plain text."""
    doc = serve_app.api.openapi()
    routes = {("post", "/v1/segment"): _SERVICE.segment, ("get", "/v1/passports/{scan_id}"): _SERVICE.get_passport}
    for (method, path), fn in routes.items():
        raised = _raised_statuses(fn)
        # Also what FastAPI itself answers for a route: 422 for invalid parameters; 500 from the catch-all handler.
        raised |= {422, 500}
        responses = doc["paths"][path][method]["responses"]
        documented = {int(s) for s in responses if s != "200"}
        assert raised == documented, (path, sorted(raised), sorted(documented))
        for status in documented:
            content = responses[str(status)]["content"]
            assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, status
            assert responses[str(status)]["description"] == serve_app.ERROR_STATUSES[status]
    segment_503 = doc["paths"]["/v1/segment"]["post"]["responses"]["503"]
    assert "text/plain" in segment_503["content"] and "Retry-After" in segment_503["headers"]
    # A deployment without a store or output prefix is a permanent state: 501, never 503 ("retry later").
    assert 503 not in _raised_statuses(_SERVICE.get_passport)
    assert {400, 501} <= _raised_statuses(_SERVICE.segment)


def test_the_docs_page_and_its_assets_come_from_this_server_without_a_token():
    from fastapi.testclient import TestClient

    client = TestClient(serve_app.api)
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and not [u for u in urls if "//" in u], urls  # no CDN, no other host: relative to this server
    assert "/openapi.json" in urls
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and r.content, url
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    _error_plain = client.get("/docs/assets/..%2F..%2F__init__.py")
    assert _error_plain.status_code == 404
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: off


def test_uris_under_an_allowed_prefix_pass():
    prefixes = ["s3://scans/in/", "s3://archive"]
    for uri in ("s3://scans/in/a.nii.gz", "s3://scans/in/series/", "s3://archive/x/y.zip"):
        assert check_uri_allowed(uri, prefixes) == uri


# ------------------------------------------------------------------------------------------------- Serve


def test_health_readiness_and_openapi(service):
    client = service["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and MODEL in ready.json()["models"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/passports/{scan_id}", "/healthz", "/readyz"} <= set(paths)
    assert "application/zip" in paths["/v1/segment"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_nifti_body_gives_the_in_process_passport_and_the_mask_on_request(service, scans, reference):
    client = service["client"]
    r = _segment(client, scans["phantom"], "application/gzip", scan_id="phantom-body")
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    assert doc["scan_id"] == "phantom-body" and r.headers["x-model-key"] == MODEL
    _same_result(doc, reference["phantom"])
    assert {"read_s", "segment_s", "passport_s"} <= set(doc["timings"])

    mask = client.post(
        "/v1/segment",
        content=scans["phantom"],
        headers={**_auth(), "Content-Type": "application/x-nifti-gz", "Accept": "application/gzip"},
    )
    assert mask.status_code == 200 and mask.headers["content-type"] == "application/gzip"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(mask.content))
    assert list(img.shape) == doc["scan"]["shape"]
    labels = {int(v) for v in np.unique(np.asanyarray(img.dataobj))} - {0}
    assert labels == {s["label"] for s in doc["structures"].values() if s["voxel_count"]}

    # TotalSegmentator's default output: one binary NIfTI per structure, here as one zip.
    r = _segment(client, scans["phantom"], "application/gzip", scan_id="per-structure", **{"return": "segmentations"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text[:300]
    assert 'filename="per-structure.segmentations.zip"' in r.headers["content-disposition"]
    multilabel = np.asanyarray(img.dataobj)
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        names = archive.namelist()
        assert sorted(names) == sorted(f"{n}.nii.gz" for n, s in doc["structures"].items() if s["voxel_count"])
        for name in names:
            one = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(name)))
            label = doc["structures"][name.removesuffix(".nii.gz")]["label"]
            np.testing.assert_array_equal(np.asanyarray(one.dataobj), (multilabel == label).astype(np.uint8))
            np.testing.assert_array_equal(one.affine, img.affine)


def test_dicom_zip_body_gives_the_in_process_passport(service, scans, reference):
    r = _segment(service["client"], scans["dicom"], "application/zip", scan_id="dicom-zip")
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    assert doc["scan"]["dicom"] is True
    _same_result(doc, reference["dicom"])


def test_s3_uri_with_persist_stores_encrypted_mask_and_the_passport(service, scans, reference):
    client, s3, bucket = service["client"], service["s3"], service["bucket"]
    s3.put_object(Bucket=bucket, Key="in/phantom.nii.gz", Body=scans["phantom"])
    r = client.post(
        "/v1/segment",
        params={"persist": "true"},
        headers=_auth(),
        json={"uri": f"s3://{bucket}/in/phantom.nii.gz", "scan_id": "phantom-s3"},
    )
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    _same_result(doc, reference["phantom"])
    assert doc["scan"]["source_uri"] == f"s3://{bucket}/in/phantom.nii.gz"
    mask_uri = doc["outputs"]["mask"]
    assert mask_uri == f"s3://{bucket}/out/phantom-s3/{MODEL}/mask.nii.gz"
    assert r.headers["x-passport-uri"] == f"s3://{bucket}/out/phantom-s3/{MODEL}/passport.json"
    head = s3.head_object(Bucket=bucket, Key=f"out/phantom-s3/{MODEL}/mask.nii.gz")
    assert head["ServerSideEncryption"] == "AES256"

    stored = open_passport_store(f"dynamodb://{service['table']}").get("phantom-s3", MODEL)
    assert stored == doc
    fetched = client.get("/v1/passports/phantom-s3", headers=_auth())
    assert fetched.status_code == 200 and fetched.json() == doc
    assert client.get("/v1/passports/phantom-s3", params={"model_key": MODEL}, headers=_auth()).json() == doc


def test_every_refusal_is_a_json_error_and_the_service_keeps_answering(service, scans):
    client, bucket = service["client"], service["bucket"]
    good = scans["phantom"]
    gz = {"Content-Type": "application/gzip"}

    for headers in ({}, _auth("x" * 32), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
        r = client.post("/v1/segment", content=good, headers={**gz, **headers})
        _error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    _error(client.get("/v1/passports/phantom-s3"), 401, "unauthorized")

    _error(_segment(client, b"\0" * (MAX_BODY + 1), "application/gzip"), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(MAX_BODY // (256 * 1024) + 2):
            yield b"\0" * (256 * 1024)

    r = client.post("/v1/segment", content=chunks(), headers={**_auth(), **gz})
    assert "content-length" not in r.request.headers
    _error(r, 413, "body_too_large")

    _error(_segment(client, good, "text/plain"), 415, "unsupported_media_type")
    _error(client.post("/v1/segment", content=good, headers=_auth()), 415, "unsupported_media_type")
    _error(_segment(client, scans["corrupt"], "application/gzip"), 422, "truncated_file")
    _error(_segment(client, b"not a scan at all", "application/octet-stream"), 422, "unreadable_scan")
    _error(_segment(client, good, "application/gzip", scan_id="../etc"), 422, "invalid_id")
    _error(_segment(client, good, "application/gzip", mode="turbo"), 422, "invalid_request")
    _error(_segment(client, good, "application/gzip", roi_subset="no_such_organ"), 422, "invalid_roi_subset")
    _error(client.post("/v1/segment", headers=_auth(), json={"url": "s3://x/y"}), 422, "invalid_request")
    _error(
        client.post("/v1/segment", headers=_auth(), json={"uri": f"s3://{bucket}/in/absent.nii.gz"}),
        422,
        "object_not_found",
    )

    for uri in (
        f"s3://{bucket}-other/in/phantom.nii.gz",
        f"s3://{bucket}/out/x.nii.gz",
        "http://127.0.0.1:9/x.nii.gz",
        "file:///etc/passwd",
        "/etc/passwd",
    ):
        _error(client.post("/v1/segment", headers=_auth(), json={"uri": uri}), 403, "uri_not_allowed")

    _error(client.get("/v1/passports/never-segmented", headers=_auth()), 404, "passport_not_found")
    _error(client.get("/v1/nothing-here", headers=_auth()), 404, "not_found")

    r = _segment(client, good, "application/gzip", scan_id="after-errors", **{"return": "preview"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert r.headers["x-passport-status"] == "ok"


@pytest.fixture(scope="module")
def bare_service(service, tmp_path_factory):
    """A second app on the same Serve, under /bare, with neither passport store nor output prefix."""
    from ray import serve

    from ray_app.adapters.serve import build_app

    token_file = tmp_path_factory.mktemp("secret-bare") / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    serve.run(
        build_app(
            {
                "min_replicas": 1,
                "max_replicas": 1,
                "num_cpus": 1,
                "settings": {"api_token_file": str(token_file), "download_weights": False},
            }
        ),
        name="bare",
        route_prefix="/bare",
    )
    try:
        yield service["client"]
    finally:
        serve.delete("bare")  # gives its CPU back


def test_a_deployment_without_store_answers_501_which_its_document_lists(bare_service, scans):
    client = bare_service
    err = _error(client.get("/bare/v1/passports/anything", headers=_auth()), 501, "passport_store_not_configured")
    assert "passport_store" in err["message"]
    _error(
        client.post(
            "/bare/v1/segment",
            content=scans["phantom"],
            params={"persist": "true"},
            headers={**_auth(), "Content-Type": "application/gzip"},
        ),
        501,
        "persist_not_configured",
    )
    _error(client.get("/bare/v1/passports/anything"), 401, "unauthorized")


def test_the_docs_under_a_route_prefix_load_their_assets_from_the_same_prefix(bare_service):
    client = bare_service
    page = client.get("/bare/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and all(u.startswith("/bare/") for u in urls), urls
    for url in urls:
        assert client.get(url).status_code == 200, url


@pytest.fixture
def docs_server():
    """The app's FastAPI object under uvicorn on a loopback port in this process: /docs, its assets and
    /openapi.json need no replica (no model, no Ray), so a browser can load them without the load of a service."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(serve_app.api, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="needs a headless Chromium (Debian: apt-get install chromium)",
)
def test_the_docs_page_renders_in_a_headless_browser_without_internet(docs_server, tmp_path):
    """Chromium loads /docs (loopback only, nothing else reachable) and runs Swagger UI: every operation of the
    document appears as a rendered block. A blank page (CDN assets) or Swagger UI 4 ("Unable to render this
    definition": it cannot read OpenAPI 3.1) renders none."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    expected = {"/healthz", "/readyz", "/v1/segment", "/v1/passports/{scan_id}"}
    for budget_ms in (20_000, 120_000):  # virtual time; a loaded machine may need the longer one
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                f"{docs_server}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        rendered = set(re.findall(r'opblock-summary-path" data-path="([^"]+)"', done.stdout))
        if rendered:
            break
    assert rendered == expected, done.stdout[-2000:]


def test_overload_is_refused_with_503_and_retry_after_and_accepted_requests_complete(service, scans):
    url, body = service["url"], scans["phantom"]

    def one(i: int) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/segment",
            content=body,
            params={"scan_id": f"burst-{i}"},
            headers={**_auth(), "Content-Type": "application/gzip"},
            timeout=300,
        )

    n = CAPACITY + 4
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= CAPACITY, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == str(RETRY_AFTER)
        else:
            assert r.json()["status"] == "ok"
    assert service["client"].get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------- serve deploy


def _serve_shutdown(head: dict) -> None:
    # Serve first: with Serve's actors still up, the SIGTERM'd head takes about 30 s to stop instead of 3.
    subprocess.run(
        [str(RAY_BIN / "serve"), "shutdown", "-y", "-a", head["dashboard"]],
        env=head["env"],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def head_node(phantom_weights):
    """A separate ``ray start --head`` cluster on loopback (own ports and temp dir), stopped by its PID."""
    with ray_head(
        num_cpus=1, env={"RAY_APP_API_TOKEN": TOKEN, "RAY_APP_DOWNLOAD_WEIGHTS": "false"}, before_stop=_serve_shutdown
    ) as head:
        yield head


def test_serve_deploy_of_the_repo_config_serves_the_app(head_node, scans, tmp_path):
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [str(RAY_BIN / "serve"), "deploy", str(path), "-a", head_node["dashboard"]],
        env=head_node["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150  # min_replicas 0: the first request starts a replica (cold start)
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=60).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the deployed app did not answer /healthz"
        time.sleep(1)
    r = httpx.post(
        f"{url}/v1/segment",
        content=scans["phantom"],
        params={"scan_id": "deployed"},
        headers={**_auth(), "Content-Type": "application/gzip"},
        timeout=300,
    )
    assert r.status_code == 200, r.text[:500]
    assert r.json()["status"] == "ok" and r.json()["scan_id"] == "deployed"
    _error(
        httpx.post(f"{url}/v1/segment", content=scans["phantom"], headers={"Content-Type": "application/gzip"}),
        401,
        "unauthorized",
    )
