"""No secret in any file a run leaves behind: ``ray-app batch`` and ``ray-app serve`` run with unique canary
credentials and token, then every file under their Ray temp folder (session logs, runtime_env agent log, job
and worker logs) and their outputs is searched for them. A job on a cluster gets the non-secret settings only."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from ray_app.ops.cluster import free_port, job_env
from tests._scan_factory import small_phantom
from tests._service import log_hits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RAY_APP = str(Path(sys.executable).with_name("ray-app"))


def test_batch_and_serve_leave_no_secret_in_any_log_or_output(moto_server, phantom_weights, tmp_path):
    canaries = {
        "AWS_SECRET_ACCESS_KEY": "canary" + secrets.token_hex(16),
        "AWS_SESSION_TOKEN": "canary" + secrets.token_hex(16),
        "RAY_APP_API_TOKEN": "canary" + secrets.token_hex(16),
    }
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **canaries, "RAY_TMPDIR": str(ray_tmp), "TOTALSEG_WEIGHTS_PATH": str(phantom_weights)}
    env.pop("RAY_ADDRESS", None)
    try:
        scan = tmp_path / "scan.nii.gz"
        scan.write_bytes(small_phantom(700))
        (tmp_path / "m.csv").write_text(f"scan_id,uri\nscan-0,{scan}\n")
        batch = subprocess.run(
            [
                RAY_APP,
                "batch",
                "--manifest",
                str(tmp_path / "m.csv"),
                "--output",
                str(tmp_path / "out"),
                "--max-actors",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert batch.returncode == 0, batch.stderr[-3000:]

        port = free_port()
        with open(tmp_path / "serve.log", "wb") as log:
            serve = subprocess.Popen(
                [RAY_APP, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                deadline = time.monotonic() + 180
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[
                        -3000:
                    ]
                    time.sleep(1)
                answer = client.post(
                    "/v1/segment?scan_id=scan-1",
                    content=scan.read_bytes(),
                    headers={
                        "Authorization": f"Bearer {canaries['RAY_APP_API_TOKEN']}",
                        "Content-Type": "application/gzip",
                    },
                )
                assert answer.status_code == 200, answer.text
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=120)

        logs = list(ray_tmp.rglob("runtime_env_agent*.log"))
        assert logs, "no runtime_env agent log was written: the search would prove nothing"
        files = [p for root in (ray_tmp, tmp_path) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        assert log_hits(list(canaries.values()), files) == {}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_cluster_job_gets_the_settings_and_the_region_but_no_secret(monkeypatch):
    # The region comes from the environment as the preflight resolved it; the settings from the shell given here
    # (not set in os.environ: the process's cached Settings would keep them for every later test).
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    shell = {
        "RAY_APP_PRECISION": "bf16",
        "RAY_APP_S3_SSE": "aws:kms",
        "RAY_APP_API_TOKEN": "secret-token",
        "RAY_APP_API_TOKEN_FILE": "/home/me/token",
        "AWS_SECRET_ACCESS_KEY": "secret-key",
        "AWS_REGION": "eu-central-1",
    }
    env = job_env(shell)
    assert env["RAY_APP_PRECISION"] == "bf16" and env["RAY_APP_S3_SSE"] == "aws:kms"
    assert env["RAY_APP_AWS_REGION"] == "eu-central-1", "the nodes must use the region the preflight checked"
    assert "secret" not in " ".join(env.values()) and not any(k.startswith("AWS_") for k in env)
    assert "RAY_APP_API_TOKEN" not in env and "RAY_APP_API_TOKEN_FILE" not in env
