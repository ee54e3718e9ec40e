"""A fault-injecting HTTP proxy for the moto server: S3 and DynamoDB answer as a busy AWS region does.

Point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url` and every boto3 call goes through it. Faults are injected
on a fixed schedule (every ``every``-th request to a service, rotating through that service's kinds), so a run
is reproducible and never sees more failures in a row than boto3's retry budget can absorb, yet every kind
happens. Kinds:

* ``*_before``: the request is answered with the error and never reaches moto (throttling, 503 SlowDown);
* ``*_after``: the request reaches moto (the write happens), then the client gets a 500 anyway — the ambiguous
  case that makes retried writes prove they are idempotent.

The proxy also records each request's method, path, service and the headers tests care about (e.g. the
server-side-encryption header of every S3 PUT).
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",
    "content-length",
}

_S3_SLOWDOWN = (
    503,
    "application/xml",
    (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
        b"<Message>Please reduce your request rate.</Message></Error>"
    ),
)
_S3_INTERNAL = (
    500,
    "application/xml",
    (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
        b"<Message>We encountered an internal error. Please try again.</Message></Error>"
    ),
)


def _ddb(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}).encode()
    return status, "application/x-amz-json-1.0", body


_DDB_THROTTLE = _ddb(400, "ThrottlingException", "Rate of requests exceeds the allowed throughput.")
_DDB_CAPACITY = _ddb(
    400,
    "ProvisionedThroughputExceededException",
    "The level of configured provisioned throughput for the table was exceeded.",
)
_DDB_INTERNAL = _ddb(500, "InternalServerError", "Internal server error")

#: (kind, answer, forward to moto first?) per service, in rotation order.
FAULTS = {
    "s3": [
        ("s3_503_slowdown_before", _S3_SLOWDOWN, False),
        ("s3_500_before", _S3_INTERNAL, False),
        ("s3_500_after", _S3_INTERNAL, True),
    ],
    "dynamodb": [
        ("ddb_throttling_before", _DDB_THROTTLE, False),
        ("ddb_capacity_before", _DDB_CAPACITY, False),
        ("ddb_500_before", _DDB_INTERNAL, False),
        ("ddb_500_after", _DDB_INTERNAL, True),
    ],
}


@dataclass
class Recorded:
    method: str
    path: str
    service: str
    target: str | None
    sse: str | None
    fault: str | None


@dataclass
class FaultProxy:
    """``with FaultProxy(moto_url, every={"s3": 3, "dynamodb": 2}) as proxy:`` (or one number for both);
    ``every=0`` passes everything through and only records."""

    upstream: str
    every: int | dict[str, int] = 0
    faults: Counter = field(default_factory=Counter)
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self):
        up = urlsplit(self.upstream)
        self._up_host, self._up_port = up.hostname, up.port or 80
        self._lock = threading.Lock()
        self._counters = {service: itertools.count(1) for service in FAULTS}
        self._rotation = {service: itertools.cycle(kinds) for service, kinds in FAULTS.items()}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pick_fault(self, service: str):
        with self._lock:
            n = next(self._counters[service])
            every = self.every.get(service, 0) if isinstance(self.every, dict) else self.every
            if every and n % every == 0:
                return next(self._rotation[service])
        return None

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)
            if rec.fault:
                self.faults[rec.fault] += 1

    def _handler(proxy):  # the handler class closes over the proxy, named so that ``self`` stays the handler
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: tests read proxy.requests instead
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if self.command != "HEAD" or not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                    if self.command == "HEAD" and resp.getheader("content-length") is not None:
                        keep.append(("Content-Length", resp.getheader("content-length")))
                    return resp.status, keep, data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                target = self.headers.get("x-amz-target")
                service = "dynamodb" if target and target.startswith("DynamoDB_") else "s3"
                fault = proxy._pick_fault(service)
                proxy._record(
                    Recorded(
                        self.command,
                        self.path,
                        service,
                        target,
                        self.headers.get("x-amz-server-side-encryption"),
                        fault and fault[0],
                    )
                )
                if fault and fault[2]:
                    self._forward(body)
                if fault:
                    status, content_type, payload = fault[1]
                    self._answer(status, [("Content-Type", content_type)], payload)
                    return
                self._answer(*self._forward(body))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
