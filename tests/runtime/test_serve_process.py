"""runtime/serve.py as a real process on a loopback port: concurrent requests, SIGTERM, startup errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.client import SearchClient
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.options import EngineOptions
from runtime.searcher import Searcher
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import build_gallery

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "runtime" / "serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, str(SERVE), *args], stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, log


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with SearchClient(url, timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited {proc.returncode}:\n{log.read_text()}")
            if client.ready():
                return
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"serve.py not ready after {timeout} s:\n{log.read_text()}")


def test_real_process_serves_concurrent_requests_and_stops_cleanly(small_engines, tmp_path):
    engine_path = small_engines["i2t"]
    gallery = build_gallery(engine_path, tmp_path / "gallery")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = start(
        [
            "--engine",
            str(engine_path),
            "--gallery",
            str(gallery),
            "--port",
            str(port),
            "--max-delay-ms",
            "1000",
            "--threads",
            "1",
            "--no-progress",
            "--log-format",
            "json",
        ],
        tmp_path,
    )
    try:
        wait_ready(url, proc, log)
        texts = random_captions(16, seed=3)
        regions = random_regions(8, seed=4)

        async def burst(client):
            t = [client.post("/v1/search/text", json={"queries": [q], "k": 6}) for q in texts]
            i = [
                client.post("/v1/search/images", json={"queries": regions[j : j + 1].tolist(), "k": 6})
                for j in range(len(regions))
            ]
            return await asyncio.gather(*t, *i)

        with SearchClient(url, retries=0) as client:  # the Python client answers as the searcher does
            by_client = [client.search([q], 6) for q in texts[:3]] + [client.search(regions[:2], 6)]

        # Concurrent requests on connections of their own (the synchronous client sends one at a time).
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = await burst(client)
                metrics = (await client.get("/metrics")).text
                # a second burst, with SIGTERM sent once all its requests wait in the batcher (a request the
                # server has not read yet when it stops would race with the closing keep-alive connection)
                # one request of 24 queries first: the batcher then expects that many batch-mates and, with
                # --max-delay-ms 1000, holds the second burst's smaller batches for up to a second
                big = await client.post("/v1/search/text", json={"queries": [*texts, *texts[:8]], "k": 6})
                assert big.status_code == 200
                pending = asyncio.ensure_future(burst(client))
                async with httpx.AsyncClient(base_url=url, timeout=30) as scraper:
                    for _ in range(300):
                        if (
                            f"scan_requests_in_flight {float(len(texts) + len(regions))}"
                            in (await scraper.get("/metrics")).text
                        ):
                            break
                        await asyncio.sleep(0.01)
                    else:
                        pytest.fail("the second burst never was in flight at once")
                proc.send_signal(signal.SIGTERM)
                return first, metrics, await pending

        first, metrics, during_shutdown = asyncio.run(run())
        t0 = time.monotonic()
        rc = proc.wait(timeout=15)
        assert rc == 0, log.read_text()
        assert time.monotonic() - t0 < 10
        with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime", threads=1)) as engine:
            searcher = Searcher(
                engine, images=ImageGallery.load(gallery / "images"), captions=CaptionGallery.load(gallery / "captions")
            )
            expected = [searcher.search([q], 6) for q in texts] + [
                searcher.search(regions[j : j + 1], 6) for j in range(len(regions))
            ]
            searcher_images = searcher.search(regions[:2], 6)
        for (got_s, got_i), (scores, ids) in zip(by_client, [*expected[:3], searcher_images]):
            np.testing.assert_array_equal(got_i, ids)
            np.testing.assert_allclose(got_s, scores, rtol=0, atol=1e-6)
        for responses in (first, during_shutdown):  # requests in flight at SIGTERM are answered, not dropped
            for r, (scores, ids) in zip(responses, expected):
                assert r.status_code == 200, r.text
                assert r.json()["ids"] == ids.tolist()
                np.testing.assert_allclose(r.json()["scores"], scores, rtol=0, atol=1e-6)
        count = [line for line in metrics.splitlines() if line.startswith('scan_batch_size_count{kind="text"}')]
        assert count and float(count[0].split()[-1]) < len(texts)  # batched across connections
        # --log-format json: every line one object, uvicorn's own lines included
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert any(r["logger"] == "runtime.serve" and "ready on http://127.0.0.1" in r["message"] for r in lines)
        assert any(r["logger"].startswith("uvicorn") for r in lines)
        assert not any("exception" in r for r in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_startup_errors_exit_2_in_one_line(tmp_path):
    bad = tmp_path / "scan.json"
    bad.write_text("{not a manifest")
    # a manifest that fails to load: the server starts, the background load fails, the process exits 2
    proc, log = start(["--engine", str(bad), "--gallery", str(tmp_path / "g"), "--port", str(free_port())], tmp_path)
    assert proc.wait(timeout=60) == 2, log.read_text()
    assert "error:" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--engine", "{tmp}/missing.json"], "missing.json: no such file"),
        (["--max-batch", "0"], "max_batch must be a positive integer, received 0"),
        (["--max-queries", "600"], "max_queries (600) must not exceed max_queue (512)"),
        (["--token-file", "{tmp}/nope"], "--token-file {tmp}/nope: no such file"),
        (["--token-file", "{tmp}/empty"], "empty"),
        (["--gallery", "{tmp}/scan.json"], "expected a folder, received a file"),
    ],
)
def test_bad_arguments_exit_2_before_serving(tmp_path, capsys, extra, message):
    from runtime.serve import main

    (tmp_path / "scan.json").write_text("{}")
    (tmp_path / "empty").write_text("\n")
    args = ["--engine", str(tmp_path / "scan.json"), "--gallery", str(tmp_path / "g")]
    assert main(args + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err


def test_slow_clients_time_out_and_do_not_hold_shutdown(small_engines, tmp_path):
    """Clients that send part of a request: their headers time out; bodies still arriving at SIGTERM are
    answered 503 at once instead of holding the shutdown for the grace period (30 s here)."""
    gallery = build_gallery(small_engines["t2i"], tmp_path / "gallery")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--engine", str(small_engines["t2i"]), "--gallery", str(gallery), "--port", str(port)]
    args += ["--header-timeout-s", "1", "--grace-s", "30", "--threads", "1", "--no-progress"]
    proc, log = start(args, tmp_path)
    headers, bodies = [], []
    try:
        wait_ready(url, proc, log)
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\n")
            headers.append(s)
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            bodies.append(s)
        time.sleep(2.5)
        for s in headers:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert time.monotonic() - t0 < 10
        for s in bodies:
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 503"), log.read_text()
        text = log.read_text()
        assert "GET /readyz 200" in text and "GET /healthz 200" in text  # the access log is on by default
    finally:
        for s in headers + bodies:
            s.close()
        if proc.poll() is None:
            proc.kill()


def test_a_short_token_is_warned_about(tmp_path, caplog):
    from runtime.serve import read_token

    short, long = tmp_path / "short", tmp_path / "long"
    short.write_text("abc\n")
    long.write_text("x" * 16)
    os.chmod(short, 0o600)
    os.chmod(long, 0o600)
    with caplog.at_level(logging.WARNING, logger="runtime.serve"):
        assert read_token(str(long)) == "x" * 16
        assert not caplog.records
        assert read_token(str(short)) == "abc"
    assert "3 characters" in caplog.text and "at least 16" in caplog.text
