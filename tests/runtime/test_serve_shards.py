"""The service over a sharded gallery (``runtime/serve.py --shards``): the same responses as the single-node
service, ``/v1/info`` lists the shards, appends go to the last shard, and a dead shard answers 503."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from runtime.options import EngineOptions
from runtime.searcher import ShardUnavailableError
from runtime.service.executor import Executor
from runtime.service.service import Service
from runtime.service.settings import Settings
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import N_CAPTIONS, N_IMAGES, build_gallery, local_service, request, started

TEXT, IMAGES = "/v1/search/text", "/v1/search/images"
QUERIES = ["a dog on the beach .", "red cat", "the man running on grass", "blue woman"]
ONE_THREAD = EngineOptions(backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def services(ray_cluster, small_engines, tmp_path_factory):
    """(single-node service, service over 2 shards) of the same gallery; the sharded one splits it beside."""
    from runtime.gallery.shards import ensure_split

    engine = small_engines["t2i"]
    folder = build_gallery(engine, tmp_path_factory.mktemp("serve_shards") / "g")
    local = local_service(engine, folder)
    sharded = Service(
        lambda: Executor.open([engine], ensure_split(folder, 2), ONE_THREAD, shards={"timeout_s": 3.0}),
        Settings(),
    )
    started(sharded)
    yield local, sharded
    sharded.close()
    local.close()


def assert_same_response(a, b):
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    a, b = a.json(), b.json()
    assert a["ids"] == b["ids"] and a["names"] == b["names"]
    np.testing.assert_allclose(np.array(a["scores"], np.float64), np.array(b["scores"], np.float64), atol=1e-5, rtol=0)


@pytest.mark.ray
def test_sharded_service_answers_as_the_single_node_one(services):
    local, sharded = services
    for url, body in (
        (TEXT, {"queries": QUERIES, "k": 5}),
        (TEXT, {"queries": QUERIES[:1], "k": N_IMAGES + 3}),
        (IMAGES, {"queries": random_regions(3, seed=7).tolist(), "k": 25}),
    ):
        assert_same_response(request(local, "POST", url, json=body), request(sharded, "POST", url, json=body))
    info = request(sharded, "GET", "/v1/info").json()
    assert [s["index"] for s in info["shards"]] == [0, 1] and all(s["node"] for s in info["shards"])
    assert [s["images"] for s in info["shards"]] == [N_IMAGES // 2, N_IMAGES - N_IMAGES // 2]
    assert info["galleries"]["captions"]["count"] == N_CAPTIONS and info["backend"] == "onnxruntime"
    bad = request(sharded, "POST", TEXT, json={"queries": ["dog"], "k": 0})
    assert bad.status_code == 422 and "k" in bad.json()["error"]


@pytest.mark.ray
def test_dead_shard_is_503_then_the_same_answers(services, ray_cluster):
    local, sharded = services
    body = {"queries": QUERIES, "k": 7}
    want = request(local, "POST", TEXT, json=body)
    actors = sharded.executor.searcher.shards.actors
    old_pid = sharded.executor.searcher.shards.info()[1]["pid"]
    ray_cluster.kill(actors[1], no_restart=False)
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = request(sharded, "POST", TEXT, json=body)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and "shard 1" in r.json()["error"], r.text
        else:
            assert_same_response(want, r)  # never a partial or wrong top-k
            pids = [s["pid"] for s in request(sharded, "GET", "/v1/info").json().get("shards", [])]
            if len(pids) == 2 and pids[1] != old_pid:
                break
        time.sleep(0.05)
    assert set(statuses) <= {200, 503} and statuses[-1] == 200, statuses


@pytest.mark.ray
def test_appends_through_the_sharded_service(services):
    local, sharded = services
    new = {"features": random_regions(3, seed=11).tolist(), "names": ["n0", "n1", "n2"]}
    for svc in services:
        r = request(svc, "POST", "/v1/gallery/images", json=new)
        assert r.status_code == 200, r.text
        assert r.json() == {"added": 3, "ids": [N_IMAGES, N_IMAGES + 1, N_IMAGES + 2], "count": N_IMAGES + 3}
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a red dog on the grass ."]})
        assert r.json() == {"added": 1, "ids": [N_CAPTIONS], "count": N_CAPTIONS + 1}
    bad = request(sharded, "POST", "/v1/gallery/images", json={"features": new["features"]})
    assert bad.status_code == 409 and "names" in bad.json()["error"]
    for url, body in (
        (TEXT, {"queries": QUERIES, "k": N_IMAGES + 3}),
        (IMAGES, {"queries": random_regions(2, seed=8).tolist(), "k": N_CAPTIONS + 1}),
    ):
        assert_same_response(request(local, "POST", url, json=body), request(sharded, "POST", url, json=body))
    info = request(sharded, "GET", "/v1/info").json()["shards"]
    assert info[0]["images"] == N_IMAGES // 2 and info[1]["images"] == N_IMAGES - N_IMAGES // 2 + 3


class _DeadShards(Executor):
    """A local executor whose searches meet a dead shard."""

    def search(self, direction, queries, k):
        raise ShardUnavailableError("search_text: shard 3 is unavailable (dead or restarting; Ray restarts it)")


def test_shard_unavailable_maps_to_503_with_retry_after(small_engines, tmp_path):
    engine = small_engines["t2i"]
    folder = build_gallery(engine, tmp_path / "g")
    svc = Service(lambda: _DeadShards.open([engine], folder, ONE_THREAD), Settings())
    started(svc)
    try:
        r = request(svc, "POST", TEXT, json={"queries": random_captions(2), "k": 3})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "shard 3 is unavailable" in r.json()["error"]
        assert request(svc, "GET", "/healthz").status_code == 200  # the server keeps serving
    finally:
        svc.close()


def test_cli_refuses_ray_address_without_shards(small_engines, tmp_path, capsys):
    from runtime.serve import main

    args = ["--engine", str(small_engines["t2i"]), "--gallery", str(tmp_path)]
    assert main([*args, "--ray-address", "10.0.0.1:6379"]) == 2
    assert "--ray-address needs --shards" in capsys.readouterr().err
    assert main([*args, "--shards", "0"]) == 2
    assert "--shards must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_real_process_with_shards(small_engines, tmp_path):
    """runtime/serve.py --shards 2 as a real process: splits the gallery beside it, answers as Searcher does,
    lists its shards, and exits 0 on SIGTERM (taking its local Ray instance down)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from runtime.client import SearchClient
    from runtime.engine import ScanEngine
    from runtime.gallery import ImageGallery
    from runtime.searcher import Searcher

    engine_path = small_engines["t2i"]
    gallery = build_gallery(engine_path, tmp_path / "gallery")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    repo = Path(__file__).resolve().parents[2]
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(repo / "runtime" / "serve.py"),
                "--engine",
                str(engine_path),
                "--gallery",
                str(gallery),
                "--shards",
                "2",
                "--port",
                str(port),
                "--threads",
                "1",
                "--no-progress",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
    try:
        with SearchClient(url, retries=0) as client:
            deadline = time.monotonic() + 180
            while not client.ready():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            got_scores, got_ids = client.search(QUERIES, 7)
            assert len(client.info()["shards"]) == 2
        with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime", threads=1)) as engine:
            scores, ids = Searcher(engine, images=ImageGallery.load(gallery / "images")).search(QUERIES, 7)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_scores, scores, atol=1e-5, rtol=0)
        assert (tmp_path / "gallery.shards-2" / "shards.json").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
