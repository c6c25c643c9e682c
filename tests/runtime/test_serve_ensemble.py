"""The service over an ensemble (runtime/serve.py with several --engine): batched, appended, described."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import GalleryFolder
from runtime.gallery.members import ENSEMBLE
from runtime.options import EngineOptions, WriteOptions
from runtime.searcher import Searcher
from runtime.serve import main as serve_main
from runtime.service.executor import Executor
from runtime.service.service import Service
from runtime.service.settings import Batching, Settings
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import N_CAPTIONS, N_IMAGES, request, run_client, started

WEIGHTS = "0.3,0.7"
TEXT, IMAGES = "/v1/search/text", "/v1/search/images"
ONE_THREAD = EngineOptions(backend="onnxruntime", threads=1)


def paths(small_engines) -> list:
    return [small_engines["t2i"], small_engines["i2t"]]


def build(small_engines, folder):
    engines = [ScanEngine.open(p, EngineOptions(backend="onnxruntime", threads=1)) for p in paths(small_engines)]
    try:
        names = [f"img{i}" for i in range(N_IMAGES)]
        GalleryFolder(folder, engines).write_images(
            random_regions(N_IMAGES, seed=1), names=names, options=WriteOptions(progress=False, append=True)
        )
        GalleryFolder(folder, engines).write_captions(
            random_captions(N_CAPTIONS, seed=2), options=WriteOptions(progress=False, append=True)
        )
    finally:
        for e in engines:
            e.close()
    return folder


def ensemble_service(small_engines, folder, settings=None) -> Service:
    svc = Service(
        lambda: Executor.open(paths(small_engines), folder, ONE_THREAD, weights=WEIGHTS),
        settings,
    )
    started(svc)
    return svc


class Reference:
    """The ensemble over the same folder, opened apart from the service: what each request alone returns."""

    def __init__(self, small_engines, folder) -> None:
        self.engines = [
            ScanEngine.open(p, EngineOptions(backend="onnxruntime", threads=1)) for p in paths(small_engines)
        ]
        self.ensemble = Searcher(
            self.engines,
            images=GalleryFolder(folder, self.engines).load().images,
            captions=GalleryFolder(folder, self.engines).load().captions,
            weights=WEIGHTS,
        )

    def check(self, response, queries, k) -> None:
        assert response.status_code == 200, response.text
        scores, ids = self.ensemble.search(queries, k)
        assert response.json()["ids"] == ids.tolist()
        got = np.array([[np.nan if s is None else s for s in row] for row in response.json()["scores"]], np.float32)
        np.testing.assert_allclose(got, np.where(ids < 0, np.nan, scores), rtol=0, atol=1e-6)

    def close(self) -> None:
        for e in self.engines:
            e.close()


@pytest.fixture(scope="module")
def gallery(small_engines, tmp_path_factory):
    return build(small_engines, tmp_path_factory.mktemp("serve_ensemble") / "gal")


def test_batched_ensemble_results_equal_each_request_alone(small_engines, gallery):
    """Both directions, requests merged into batches: ids equal and scores within 1e-6 of the ensemble alone."""
    svc = ensemble_service(small_engines, gallery, Settings(Batching(max_batch=16, max_delay_ms=150)))
    texts = random_captions(16, seed=5)
    text_jobs = [(texts[i : i + 1 + i % 3], 1 + (i * 7) % 45) for i in range(0, 16, 2)]
    image_jobs = [(random_regions(1 + i % 3, seed=30 + i), 1 + (i * 11) % 65) for i in range(6)]

    async def body(client):
        t = [client.post(TEXT, json={"queries": q, "k": k}) for q, k in text_jobs]
        i = [client.post(IMAGES, json={"queries": q.tolist(), "k": k}) for q, k in image_jobs]
        return await asyncio.gather(*t, *i), (await client.get("/metrics")).text

    ref = Reference(small_engines, gallery)
    try:
        responses, metrics = run_client(svc, body)
        for (q, k), r in zip(text_jobs + image_jobs, responses):
            ref.check(r, q, k)
        batches = [line for line in metrics.splitlines() if line.startswith('scan_batch_size_count{kind="text"}')]
        assert float(batches[0].split()[-1]) < len(text_jobs)  # requests were merged: not vacuous
        info = request(svc, "GET", "/v1/info").json()
        assert [m["weight"] for m in info["ensemble"]] == pytest.approx([0.3, 0.7])
        assert [m["engine"] for m in info["ensemble"]] == [str(p) for p in paths(small_engines)]
        assert info["galleries"]["images"]["count"] == N_IMAGES
    finally:
        svc.close()
        ref.close()


def test_appends_extend_every_member_and_are_visible(small_engines, gallery, tmp_path):
    import shutil

    folder = tmp_path / "gal"
    shutil.copytree(gallery, folder)
    svc = ensemble_service(small_engines, folder)
    try:
        new = random_regions(3, seed=11)
        r = request(svc, "POST", "/v1/gallery/images", json={"features": new.tolist(), "names": ["n0", "n1", "n2"]})
        assert r.status_code == 200, r.text
        assert r.json() == {"added": 3, "ids": [N_IMAGES, N_IMAGES + 1, N_IMAGES + 2], "count": N_IMAGES + 3}
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a red dog on the grass ."]})
        assert r.status_code == 200 and r.json()["count"] == N_CAPTIONS + 1, r.text
        ref = Reference(small_engines, folder)  # reads what the appends committed, for every member
        try:
            assert [len(g) for g in ref.ensemble.galleries("images")] == [N_IMAGES + 3] * 2
            assert [len(g) for g in ref.ensemble.galleries("captions")] == [N_CAPTIONS + 1] * 2
            queries = ["a dog on the beach .", "red cat"]
            ref.check(request(svc, "POST", TEXT, json={"queries": queries, "k": N_IMAGES + 3}), queries, N_IMAGES + 3)
            q = random_regions(2, seed=5)
            ref.check(request(svc, "POST", IMAGES, json={"queries": q.tolist(), "k": 7}), q, 7)
        finally:
            ref.close()
        # a bad append changes nothing (here: no names for a gallery that has them)
        r = request(svc, "POST", "/v1/gallery/images", json={"features": new.tolist()})
        assert r.status_code == 409 and r.json()["error"].startswith("names")
        assert request(svc, "GET", "/readyz").json()["images"] == N_IMAGES + 3
    finally:
        svc.close()


def test_ensemble_service_starts_empty_and_appends_create_the_gallery(small_engines, tmp_path):
    svc = ensemble_service(small_engines, tmp_path / "empty")
    try:
        assert request(svc, "POST", TEXT, json={"queries": ["dog"], "k": 2}).status_code == 409
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a dog .", "a cat on the grass ."]})
        assert r.status_code == 200 and r.json()["count"] == 2, r.text
        assert (tmp_path / "empty" / ENSEMBLE).is_file()
        hits = request(svc, "POST", IMAGES, json={"queries": random_regions(1, seed=3).tolist(), "k": 3}).json()
        assert sorted(hits["ids"][0][:2]) == [0, 1] and hits["ids"][0][2] == -1
    finally:
        svc.close()


def test_a_single_model_gallery_is_refused_at_load(small_engines, tmp_path):
    from runtime.gallery import build_image_gallery

    with ScanEngine.open(small_engines["t2i"], EngineOptions(backend="onnxruntime", threads=1)) as engine:
        build_image_gallery(
            engine, random_regions(4, seed=1), tmp_path / "single" / "images", options=WriteOptions(progress=False)
        )
    svc = Service(lambda: Executor.open(paths(small_engines), tmp_path / "single", ONE_THREAD))
    try:
        svc.start().join(60)
        assert not svc.ready
        r = request(svc, "GET", "/readyz")
        assert r.status_code == 503 and "one model only" in r.json()["error"]
        assert f"member 2 ({small_engines['i2t']})" in r.json()["error"]
    finally:
        svc.close()


def test_serve_cli_checks_the_weights(small_engines, tmp_path, capsys):
    engines = [arg for p in paths(small_engines) for arg in ("--engine", str(p))]
    assert serve_main([*engines, "--weights", "1,2,3", "--gallery", str(tmp_path)]) == 2
    assert "one weight per engine (2), received 3" in capsys.readouterr().err
    assert serve_main([*engines, "--weights", "1,-1", "--gallery", str(tmp_path)]) == 2
    assert "positive finite" in capsys.readouterr().err


def test_real_process_serves_the_ensemble(small_engines, gallery, tmp_path):
    """runtime/serve.py with two --engine as a process: its answers are the ensemble's; SIGTERM exits 0."""
    import signal
    import subprocess

    import httpx

    from tests.runtime.test_serve_process import free_port, start, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engines = [arg for p in paths(small_engines) for arg in ("--engine", str(p))]
    args = [*engines, "--weights", WEIGHTS, "--gallery", str(gallery), "--port", str(port), "--threads", "1"]
    proc, log = start([*args, "--no-progress"], tmp_path)
    ref = Reference(small_engines, gallery)
    try:
        wait_ready(url, proc, log)
        queries = ["a dog on the beach .", "the man running"]
        ref.check(httpx.post(url + TEXT, json={"queries": queries, "k": 5}, timeout=60), queries, 5)
        q = random_regions(2, seed=9)
        ref.check(httpx.post(url + IMAGES, json={"queries": q.tolist(), "k": 4}, timeout=60), q, 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert f"engine {small_engines['t2i']}, {small_engines['i2t']}" in log.read_text()
    finally:
        ref.close()
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
