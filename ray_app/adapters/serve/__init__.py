"""The Serve endpoint: one scan per HTTP request, segmented by replicas that keep their models loaded.

A FastAPI ingress (so ``/docs`` and ``/openapi.json`` come for free) over the same ``scan`` → ``pipeline``
functions as the batch job, so a passport from here equals the batch job's for the same scan and weights.

Limits are layered so overload and abuse cost little:

* Ray Serve: ``max_ongoing_requests`` per replica and ``max_queued_requests`` per proxy; beyond them Serve's
  proxy answers ``503`` with ``Retry-After`` (``backpressure_config``) instead of queueing without bound.
* Here: the bearer token is checked before the body is touched, ``Content-Length`` before it is read, and the
  streamed byte count while it is read; a ``uri`` must be ``s3://`` under ``allowed_uri_prefixes``.
* Each replica runs one segmentation at a time (one compute thread; Ray gives the replica ``num_cpus`` threads),
  so a second request in a replica waits there instead of halving the speed of both.

Start: ``serve run ray_app.adapters.serve:app`` (builder args as ``key=value``), ``serve deploy serve_config.yaml``
or ``ray-app serve``. The token comes from ``RAY_APP_API_TOKEN`` or the file named by ``RAY_APP_API_TOKEN_FILE``
(a mounted secret) in the replicas' environment; a replica refuses to start without one.
"""

# The package's public names, for ``ray_app.adapters.serve:app`` (Serve's import path) and the CLI.
from ray_app.adapters.serve.http import (
    BODY_KINDS,
    ERROR_STATUSES,
    PASSPORT_ERRORS,
    SEGMENT_ERRORS,
    ApiError,
    ErrorBody,
    Passport,
    Readiness,
    UriRequest,
    check_uri_allowed,
    load_token,
    passport_model,
    read_body,
)
from ray_app.adapters.serve.service import AppArgs, SegmentService, api, app, build_app

__all__ = [
    "BODY_KINDS",
    "ERROR_STATUSES",
    "PASSPORT_ERRORS",
    "SEGMENT_ERRORS",
    "ApiError",
    "AppArgs",
    "ErrorBody",
    "Passport",
    "Readiness",
    "SegmentService",
    "UriRequest",
    "api",
    "app",
    "build_app",
    "check_uri_allowed",
    "load_token",
    "passport_model",
    "read_body",
]
