"""The HTTP API in process (ASGI transport): every endpoint, every kind of bad input, the token, overload."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading

import numpy as np
import pytest

import runtime
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.options import EngineOptions, WriteOptions
from runtime.searcher import Searcher
from runtime.service.executor import Executor
from runtime.service.service import Service
from runtime.service.settings import Batching, Limits, Settings
from runtime.service.types import Appended, Hits
from runtime.stages import STAGES
from runtime.threads import Threads, available_cores
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import (
    N_CAPTIONS,
    N_IMAGES,
    copy_gallery,
    local_service,
    request,
    run_client,
    started,
)

QUERIES = ["a dog on the beach .", "red cat", "the man running on grass", "blue woman"]


def search_text(executor: Executor, queries: list[str], k: int) -> Hits:
    return executor.search("text_to_image", executor.prepare("text_to_image", queries), k)


@pytest.fixture(scope="module")
def reference(engine_t2i, gallery):
    """Searcher over the same gallery, opened independently of the service."""
    with ScanEngine.open(engine_t2i, EngineOptions(backend="onnxruntime", threads=1)) as engine:
        images = ImageGallery.load(gallery / "images", engine.manifest.image_encoder_id)
        captions = CaptionGallery.load(gallery / "captions", engine.manifest.text_encoder_id)
        yield engine, Searcher(engine, images=images, captions=captions)


@pytest.fixture(scope="module")
def service(engine_t2i, gallery):
    svc = local_service(
        engine_t2i,
        gallery,
        Settings(limits=Limits(max_queries=8, max_k=50, max_caption_chars=200, max_body_bytes=1 << 16)),
    )
    yield svc
    svc.close()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- search


def test_search_text_equals_searcher(service, reference):
    _, searcher = reference
    r = request(service, "POST", "/v1/search/text", json={"queries": QUERIES, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    scores, ids = searcher.search(QUERIES, 5)
    assert body["ids"] == ids.tolist()
    np.testing.assert_allclose(np.array(body["scores"], np.float32), scores, rtol=0, atol=1e-6)
    assert body["names"] == [[f"img{i}" for i in row] for row in ids.tolist()]
    assert all(row == sorted(row, reverse=True) for row in body["scores"])


def test_search_text_default_k_is_10(service):
    r = request(service, "POST", "/v1/search/text", json={"queries": ["dog"]})
    assert r.status_code == 200 and len(r.json()["ids"][0]) == 10


def test_search_images_json_and_npy_equal_searcher(service, reference):
    _, searcher = reference
    regions = random_regions(3, seed=7)
    scores, ids = searcher.search(regions, 4)
    as_json = request(service, "POST", "/v1/search/images", json={"queries": regions.tolist(), "k": 4})
    as_npy = request(
        service,
        "POST",
        "/v1/search/images?k=4",
        content=npy_bytes(regions),
        headers={"Content-Type": "application/octet-stream"},
    )
    texts = random_captions(N_CAPTIONS, seed=2)
    for r in (as_json, as_npy):
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == ids.tolist()
        np.testing.assert_allclose(np.array(r.json()["scores"], np.float32), scores, rtol=0, atol=1e-6)
        assert r.json()["names"] == [[texts[i] for i in row] for row in ids.tolist()]


def test_k_past_the_gallery_gives_minus_one_and_nulls(service):
    r = request(service, "POST", "/v1/search/text", json={"queries": ["dog"], "k": N_IMAGES + 3})
    body = r.json()
    assert r.status_code == 200
    assert body["ids"][0][N_IMAGES:] == [-1, -1, -1]
    assert body["scores"][0][N_IMAGES:] == [None, None, None]
    assert body["names"][0][N_IMAGES:] == [None, None, None]
    assert sorted(body["ids"][0][:N_IMAGES]) == list(range(N_IMAGES))


# ---------------------------------------------------------------------------------------------- bad input

TEXT = "/v1/search/text"
IMAGES = "/v1/search/images"
BAD = [
    # (url, request kwargs, status, field, limit, received)
    (TEXT, dict(content=b"{not json"), 400, "body", None, None),
    (TEXT, dict(content=b""), 400, "body", None, None),
    (TEXT, dict(content=b"\xff\xfe"), 400, "body", None, None),
    (TEXT, dict(json=["dog"]), 422, "body", None, "array"),
    (TEXT, dict(json={"k": 3}), 422, "queries", None, None),
    (TEXT, dict(json={"queries": "dog"}), 422, "queries", None, "string"),
    (TEXT, dict(json={"queries": []}), 422, "queries", None, 0),
    (TEXT, dict(json={"queries": ["dog", 3]}), 422, "queries[1]", None, "integer"),
    (TEXT, dict(json={"queries": ["dog", None]}), 422, "queries[1]", None, "null"),
    (TEXT, dict(json={"queries": ["   "]}), 422, "queries[0]", None, "   "),
    (TEXT, dict(json={"queries": ["dog"] * 9}), 413, "queries", 8, 9),
    (TEXT, dict(json={"queries": ["dog " * 60]}), 413, "queries[0]", 200, 240),
    (TEXT, dict(json={"queries": ["dog " * 30]}), 422, None, None, None),  # over the model's max_words
    (TEXT, dict(json={"queries": ["dog"], "k": 0}), 422, "k", None, 0),
    (TEXT, dict(json={"queries": ["dog"], "k": -2}), 422, "k", None, -2),
    (TEXT, dict(json={"queries": ["dog"], "k": "5"}), 422, "k", None, None),
    (TEXT, dict(json={"queries": ["dog"], "k": True}), 422, "k", None, None),
    (TEXT, dict(json={"queries": ["dog"], "k": 2.5}), 422, "k", None, 2.5),
    (TEXT, dict(json={"queries": ["dog"], "k": None}), 200, None, None, None),  # null k = default
    (TEXT, dict(json={"queries": ["dog"], "k": 51}), 422, "k", 50, 51),
    (TEXT, dict(json={"queries": ["dog"], "K": 5}), 422, "K", None, None),
    (
        TEXT,
        dict(content=b'{"queries": ["dog"]}', headers={"Content-Type": "text/plain"}),
        415,
        "Content-Type",
        None,
        "text/plain",
    ),
    (TEXT, dict(content=b'{"queries": ["' + b"a" * 70000 + b'"]}'), 413, "body", 1 << 16, 70017),
    (IMAGES, dict(json={"queries": [[1.0] * 12]}), 422, None, None, None),  # rank 2
    (IMAGES, dict(json={"queries": [[[1.0] * 11]]}), 422, None, None, None),  # img_dim 11
    (IMAGES, dict(json={"queries": [[["a"] * 12]]}), 422, "queries", None, None),
    (IMAGES, dict(json={"queries": [[[1.0] * 12], [[1.0] * 11]]}), 422, "queries", None, None),  # ragged
    (IMAGES, dict(json={"queries": []}), 422, "queries", None, 0),
    (IMAGES, dict(json={"queries": [[[1.0] * 12]] * 9}), 413, "queries", 8, 9),
    (IMAGES, dict(content=b'{"queries": [[[NaN' + b", 1.0" * 11 + b"]]]}"), 422, None, None, None),
    (IMAGES, dict(json={"queries": [[[1.0] * 12]], "k": 0}), 422, "k", None, 0),
    (
        IMAGES,
        dict(content=b"not an npy", headers={"Content-Type": "application/octet-stream"}),
        400,
        "body",
        None,
        None,
    ),
    (IMAGES, dict(content=b"", headers={"Content-Type": "application/octet-stream"}), 400, "body", None, None),
    (
        IMAGES,
        dict(
            content=npy_bytes(np.array([{"x": 1}], dtype=object)), headers={"Content-Type": "application/octet-stream"}
        ),
        400,
        "body",
        None,
        None,
    ),  # pickled
    (
        IMAGES,
        dict(content=npy_bytes(np.ones((1, 2, 12), np.int32)), headers={"Content-Type": "application/octet-stream"}),
        422,
        "body",
        None,
        "int32",
    ),
    (
        IMAGES + "?k=zero",
        dict(content=npy_bytes(np.ones((1, 2, 12), np.float32)), headers={"Content-Type": "application/octet-stream"}),
        422,
        "k",
        None,
        "zero",
    ),
]


@pytest.mark.parametrize(
    "url,kwargs,status,field,limit,received",
    BAD,
    ids=[f"{i}-{b[0].rsplit('/', 1)[-1]}-{b[2]}" for i, b in enumerate(BAD)],
)
def test_bad_input_is_a_4xx_naming_the_field(service, url, kwargs, status, field, limit, received):
    r = request(service, "POST", url, **kwargs)
    assert r.status_code == status, r.text
    if status == 200:
        return
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert body["field"] == field and body["error"].startswith(field.split("[")[0])
    if limit is not None:
        assert body["limit"] == limit and str(limit) in body["error"]
    if received is not None:
        assert body["received"] == received


def test_npz_body_is_refused(service):
    buf = io.BytesIO()
    np.savez(buf, a=np.ones((1, 2, 12), np.float32))
    r = request(service, "POST", IMAGES, content=buf.getvalue(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "npz" in r.json()["error"]


def test_chunked_body_over_the_limit_is_413(service):
    async def body(client):
        async def chunks():
            for _ in range(20):
                yield b" " * 8192

        return await client.post(TEXT, content=chunks(), headers={"Content-Type": "application/json"})

    r = run_client(service, body)
    assert r.status_code == 413 and r.json()["limit"] == 1 << 16


def test_unknown_route_and_method_are_json(service):
    assert request(service, "GET", "/v2/nothing").status_code == 404
    r = request(service, "GET", TEXT)
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------------------------- info, health, metrics


def test_info_health_ready_metrics_docs(service):
    info = request(service, "GET", "/v1/info").json()
    assert info["ready"] is True
    assert info["galleries"]["images"]["count"] == N_IMAGES and info["galleries"]["captions"]["count"] == N_CAPTIONS
    assert info["backend"] == "onnxruntime" and info["precision"] == "fp32"
    assert info["model"]["config"]["img_dim"] == 12
    workers = Threads.for_cores().batch_workers  # 1 below 32 cores
    assert info["batching"] == {"max_batch": 32, "max_delay_ms": 5.0, "workers": workers, "max_queue": 512}
    assert info["limits"]["max_queries"] == 8 and info["versions"]["numpy"] == np.__version__
    assert request(service, "GET", "/healthz").json() == {"status": "ok"}
    assert request(service, "GET", "/readyz").json() == {"status": "ready", "images": N_IMAGES, "captions": N_CAPTIONS}
    request(service, "POST", TEXT, json={"queries": ["dog"], "k": 0})
    metrics = request(service, "GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'scan_requests_total{endpoint="/v1/search/text",status="422"}' in text
    assert 'scan_gallery_size{kind="images"} 40.0' in text
    assert "scan_batch_size_bucket" in text and "scan_queue_depth" in text and "scan_request_seconds_bucket" in text
    assert request(service, "GET", "/docs").status_code == 200
    spec = request(service, "GET", "/openapi.json").json()
    assert set(spec["paths"]) >= {TEXT, IMAGES, "/v1/gallery/images", "/v1/gallery/captions", "/v1/info"}
    assert spec["info"]["version"] == info["versions"]["scan-runtime"] == runtime.__version__  # the code's, one


def test_info_shows_the_thread_budgets_and_metrics_time_each_stage(service):
    threads = request(service, "GET", "/v1/info").json()["threads"]
    budget = Threads.for_cores()
    assert threads["cores"] == available_cores() and threads["spinning"] is False and threads["inter_op"] == 1
    assert threads["intra_op"] == 1  # the fixture's --threads 1, not the budget's default
    assert threads["batch_workers"] == budget.batch_workers and threads["http_threadpool"] >= 1
    before = request(service, "GET", "/metrics").text
    assert request(service, "POST", TEXT, json={"queries": ["a dog", "two men"], "k": 3}).status_code == 200
    after = request(service, "GET", "/metrics").text

    def count(text: str, stage: str) -> float:
        line = f'scan_stage_seconds_count{{kind="text",stage="{stage}"}} '
        return next((float(x[len(line) :]) for x in text.splitlines() if x.startswith(line)), 0.0)

    assert {stage: count(after, stage) - count(before, stage) for stage in STAGES} == dict.fromkeys(STAGES, 1.0)


# ---------------------------------------------------------------------------------------------- appends


def test_appends_are_visible_after_they_return_and_persisted(engine_t2i, gallery, tmp_path):
    folder = copy_gallery(gallery, tmp_path / "g")
    svc = local_service(engine_t2i, folder)
    try:
        new = random_regions(3, seed=11)
        r = request(svc, "POST", "/v1/gallery/images", json={"features": new.tolist(), "names": ["n0", "n1", "n2"]})
        assert r.status_code == 200, r.text
        assert r.json() == {"added": 3, "ids": [N_IMAGES, N_IMAGES + 1, N_IMAGES + 2], "count": N_IMAGES + 3}
        hits = request(svc, "POST", TEXT, json={"queries": ["dog"], "k": N_IMAGES + 3}).json()
        assert sorted(hits["ids"][0]) == list(range(N_IMAGES + 3))
        assert {hits["names"][0][hits["ids"][0].index(N_IMAGES + j)] for j in range(3)} == {"n0", "n1", "n2"}
        more = random_regions(2, seed=12)
        r = request(
            svc,
            "POST",
            "/v1/gallery/images?names=" + json.dumps(["m0", "m1"]),
            content=npy_bytes(more),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 200 and r.json()["count"] == N_IMAGES + 5, r.text
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a red dog on the grass ."]})
        assert r.status_code == 200 and r.json() == {"added": 1, "ids": [N_CAPTIONS], "count": N_CAPTIONS + 1}
        hits = request(svc, "POST", IMAGES, json={"queries": random_regions(1, 5).tolist(), "k": N_CAPTIONS + 1}).json()
        assert "a red dog on the grass ." in hits["names"][0]
        assert request(svc, "GET", "/readyz").json()["images"] == N_IMAGES + 5
        metrics = request(svc, "GET", "/metrics").text
        assert 'scan_appended_total{kind="images"} 5.0' in metrics
    finally:
        svc.close()
    restarted = Executor.open([engine_t2i], folder, EngineOptions(backend="onnxruntime", threads=1))
    try:
        assert restarted.sizes() == {"images": N_IMAGES + 5, "captions": N_CAPTIONS + 1}
        # the appended images search exactly as if they had been in the gallery from the start
        with ScanEngine.open(engine_t2i, EngineOptions(backend="onnxruntime", threads=1)) as engine:
            from runtime.gallery import build_image_gallery

            ref_images = build_image_gallery(
                engine,
                np.concatenate([random_regions(N_IMAGES, seed=1), new, more]),
                tmp_path / "ref",
                options=WriteOptions(progress=False),
            )
            scores, ids = Searcher(engine, images=ref_images).search(QUERIES, 10)
        hits = search_text(restarted, QUERIES, 10)
        assert hits.ids.tolist() == ids.tolist()
        np.testing.assert_allclose(hits.scores, scores, rtol=0, atol=1e-6)
    finally:
        restarted.close()


BAD_APPENDS = [
    ("/v1/gallery/images", dict(json={"features": random_regions(2, 3).tolist()}), 409, "names"),  # gallery has names
    ("/v1/gallery/images", dict(json={"features": random_regions(2, 3).tolist(), "names": ["a"]}), 422, "names"),
    ("/v1/gallery/images", dict(json={"features": random_regions(1, 3).tolist(), "names": [1]}), 422, "names"),
    ("/v1/gallery/images", dict(json={"names": ["a"]}), 422, "features"),
    ("/v1/gallery/images", dict(json={"features": [[[1.0] * 5]], "names": ["a"]}), 422, None),
    ("/v1/gallery/captions", dict(json={"captions": []}), 422, "captions"),
    ("/v1/gallery/captions", dict(json={"captions": ["dog", 7]}), 422, "captions[1]"),
    ("/v1/gallery/captions", dict(json={"captions": ["dog " * 40]}), 422, None),  # over max_words
    ("/v1/gallery/captions", dict(content=b"[1,"), 400, "body"),
]


@pytest.mark.parametrize("url,kwargs,status,field", BAD_APPENDS, ids=[str(i) for i in range(len(BAD_APPENDS))])
def test_bad_appends_are_4xx_and_change_nothing(service, url, kwargs, status, field):
    before = request(service, "GET", "/readyz").json()
    r = request(service, "POST", url, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] and (field is None or r.json()["error"].startswith(field))
    assert request(service, "GET", "/readyz").json() == before


def test_no_gallery_is_409_until_an_append_creates_it(engine_t2i, tmp_path):
    svc = local_service(engine_t2i, tmp_path / "empty")
    try:
        assert request(svc, "GET", "/readyz").json() == {"status": "ready", "images": None, "captions": None}
        r = request(svc, "POST", TEXT, json={"queries": ["dog"]})
        assert r.status_code == 409 and "/v1/gallery/images" in r.json()["error"]
        assert request(svc, "POST", IMAGES, json={"queries": random_regions(1).tolist()}).status_code == 409
        r = request(svc, "POST", "/v1/gallery/images", json={"features": random_regions(4, 9).tolist()})
        assert r.status_code == 200 and r.json()["count"] == 4
        r = request(svc, "POST", TEXT, json={"queries": ["dog"], "k": 5})
        assert r.status_code == 200 and r.json()["ids"][0][4] == -1 and r.json()["names"][0][0] is None
    finally:
        svc.close()


def test_in_flight_search_keeps_its_generation_during_an_append(engine_t2i, gallery, tmp_path):
    """A search that started before an append commits answers from the gallery it started with."""
    folder = copy_gallery(gallery, tmp_path / "g")
    executor = Executor.open([engine_t2i], folder, EngineOptions(backend="onnxruntime", threads=1))
    try:
        expected = search_text(executor, QUERIES, N_IMAGES + 5)
        started, release = threading.Event(), threading.Event()
        searcher = executor.searcher
        old, blocks = searcher.generation("images"), searcher._blocks

        def paused(*args):  # a search that took its generation, paused until the append has committed
            started.set()
            release.wait(30)
            return blocks(*args)

        searcher._blocks = paused
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("hits", search_text(executor, QUERIES, N_IMAGES + 5)))
        t.start()
        assert started.wait(30)
        del searcher._blocks
        appended = executor.append_images(random_regions(6, seed=21), names=[f"x{i}" for i in range(6)])
        assert appended.count == N_IMAGES + 6
        committed = json.loads((folder / "images" / "gallery.json").read_text())
        assert committed["generation"] > old  # the append committed meanwhile
        release.set()
        t.join(30)
        hits = out["hits"]
        assert hits.ids.tolist() == expected.ids.tolist()  # old generation, read after its files were replaced
        np.testing.assert_array_equal(hits.scores, expected.scores)
        assert executor.sizes()["images"] == N_IMAGES + 6
        assert (search_text(executor, QUERIES, N_IMAGES + 6).ids >= N_IMAGES).any()
    finally:
        executor.close()


# ---------------------------------------------------------------------------------------------- token


def test_token_guards_writes_only(engine_t2i, gallery, tmp_path):
    svc = local_service(engine_t2i, copy_gallery(gallery, tmp_path / "g"), token="s3cret-token")
    try:
        body = {"captions": ["a dog ."]}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret-token"},
            {"Authorization": "Basic s3cret-token"},
        ):
            r = request(svc, "POST", "/v1/gallery/captions", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "s3cret" not in r.text
        r = request(svc, "POST", "/v1/gallery/images", json={"features": random_regions(1).tolist(), "names": ["a"]})
        assert r.status_code == 401
        assert request(svc, "GET", "/readyz").json()["captions"] == N_CAPTIONS
        r = request(svc, "POST", "/v1/gallery/captions", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and r.json()["count"] == N_CAPTIONS + 1
        assert request(svc, "POST", TEXT, json={"queries": ["dog"]}).status_code == 200  # search stays open
        assert request(svc, "GET", "/v1/info").json()["auth"] == {"writes_need_token": True}
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- overload, failures


class Prepared(tuple):
    """The fake's prepared queries: the captions themselves, joined by the batcher."""

    batch_key = None  # any two batch together (runtime.searcher.Queries.batch_key)

    @classmethod
    def concat(cls, parts):
        return cls(q for p in parts for q in p)


class FakeExecutor:
    """Scores query i's results as ids 0..k-1; blocks while ``gate`` is clear; fails on the query 'boom'."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []

    def prepare(self, direction, queries, field="queries"):
        return Prepared(queries)

    def search(self, direction, queries, k):
        self.gate.wait(30)
        self.calls.append(len(queries))
        if "boom" in list(queries):
            raise RuntimeError("executor exploded")
        n = len(queries)
        ids = np.tile(np.arange(k, dtype=np.int64), (n, 1))
        scores = np.tile(-np.arange(k, dtype=np.float32), (n, 1)) + np.arange(n, dtype=np.float32)[:, None]
        return Hits(scores, ids, [[str(q)] * k for q in queries])

    def append_images(self, regions, names, key=None):
        return Appended(len(regions), 0, len(regions))

    def append_captions(self, captions, key=None):
        raise OSError("disk full")

    def sizes(self):
        return {"images": 10, "captions": 10}

    def refresh(self):
        pass

    def describe(self):
        return {"galleries": {}}

    def close(self):
        pass


def test_full_queue_answers_503_with_retry_after():
    fake = FakeExecutor()
    svc = Service(lambda: fake, Settings(Batching(max_batch=2, max_delay_ms=0, max_queue=4), Limits(max_queries=4)))
    started(svc)
    fake.gate.clear()
    submitted, submit = [], svc.batcher.submit

    def counted(*args, **kwargs):
        submitted.append(args[1])
        return submit(*args, **kwargs)

    svc.batcher.submit = counted

    async def body(client):
        import asyncio

        tasks = [asyncio.create_task(client.post(TEXT, json={"queries": [f"q{i}"], "k": 2})) for i in range(12)]
        deadline = asyncio.get_running_loop().time() + 30
        while len(submitted) < len(tasks):  # each request is queued or refused once, the worker held at the gate
            assert asyncio.get_running_loop().time() < deadline, f"{len(submitted)} of {len(tasks)} reached the queue"
            await asyncio.sleep(0.01)
        fake.gate.set()
        return await asyncio.gather(*tasks)

    try:
        responses = run_client(svc, body)
        codes = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 503]
        assert refused and codes.count(200) >= 4 and set(codes) == {200, 503}
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1 and "max_queue=4" in r.json()["error"]
        for i, r in enumerate(responses):
            if r.status_code == 200:
                assert r.json()["names"][0] == [f"q{i}", f"q{i}"]  # each answered with its own rows
        assert request(svc, "POST", TEXT, json={"queries": ["later"]}).status_code == 200  # recovered
    finally:
        fake.gate.set()
        svc.close()


def test_an_internal_failure_is_500_for_that_request_only():
    fake = FakeExecutor()
    svc = Service(lambda: fake, Settings(Batching(max_batch=8, max_delay_ms=200)))
    started(svc)

    async def body(client):
        import asyncio

        queries = ["a", "boom", "b", "c"]
        return await asyncio.gather(*[client.post(TEXT, json={"queries": [q], "k": 3}) for q in queries])

    try:
        a, boom, b, c = run_client(svc, body)
        assert boom.status_code == 500 and "RuntimeError" in boom.json()["error"] and "exploded" not in boom.text
        for r, q in ((a, "a"), (b, "b"), (c, "c")):
            assert r.status_code == 200 and r.json()["names"] == [[q] * 3]
            assert r.json()["scores"] == [[0.0, -1.0, -2.0]]  # its own row 0 when run alone after the batch failed
        assert fake.calls[0] == 4  # the four were batched together first
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["dog"]})
        assert r.status_code == 500 and "OSError" in r.json()["error"]
        assert request(svc, "POST", TEXT, json={"queries": ["d"]}).status_code == 200
    finally:
        svc.close()


def test_ready_only_after_loading():
    fake = FakeExecutor()
    loaded = threading.Event()

    def slow_open():
        loaded.wait(30)
        return fake

    svc = Service(slow_open)
    svc.start()
    try:
        r = request(svc, "GET", "/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert request(svc, "GET", "/healthz").status_code == 200
        r = request(svc, "POST", TEXT, json={"queries": ["dog"]})
        assert r.status_code == 503 and "loading" in r.json()["error"]
        assert request(svc, "GET", "/v1/info").json()["ready"] is False
        loaded.set()
        svc.start().join(30)
        assert svc.ready
        assert request(svc, "GET", "/readyz").status_code == 200
        assert request(svc, "POST", TEXT, json={"queries": ["dog"]}).status_code == 200
    finally:
        loaded.set()
        svc.close()


def test_a_failed_load_stays_not_ready_with_the_reason():
    def broken():
        raise FileNotFoundError("engines/scan.json: no such file")

    svc = Service(broken)
    svc.start().join(30)
    assert not svc.ready
    r = request(svc, "GET", "/readyz")
    assert r.status_code == 503 and "no such file" in r.json()["error"]
    svc.close()


# ---------------------------------------------------------------------------------------------- limits and input
# (issue 18: one request must not freeze the service, one input must not poison it)

OCTET = {"Content-Type": "application/octet-stream"}


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An .npy v1.0 header declaring ``shape`` (no data follows)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize(
    "url,kwargs,field",
    [
        (IMAGES + "?k=3", dict(content=npy_bytes(np.ones((1, 101, 12), np.float32)), headers=OCTET), "queries"),
        (IMAGES, dict(json={"queries": np.ones((1, 101, 12)).tolist()}), "queries"),
        ("/v1/gallery/images", dict(json={"features": np.ones((1, 101, 12)).tolist(), "names": ["a"]}), "features"),
    ],
    ids=["npy", "json", "append"],
)
def test_regions_per_image_are_capped(service, url, kwargs, field):
    r = request(service, "POST", url, **kwargs)
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": f"{field}: at most 100 regions per image, received 101",
        "field": field,
        "limit": 100,
        "received": 101,
    }
    assert request(service, "GET", "/v1/info").json()["limits"]["max_regions"] == 100  # an ONNX export: R dynamic


def test_max_regions_setting_and_the_model_count(engine_t2i, gallery):
    svc = local_service(engine_t2i, gallery, Settings(limits=Limits(max_regions=3)))
    try:
        r = request(svc, "POST", IMAGES, json={"queries": np.ones((1, 4, 12)).tolist()})
        assert r.status_code == 413 and r.json()["limit"] == 3
        assert request(svc, "POST", IMAGES, json={"queries": np.ones((1, 3, 12)).tolist()}).status_code == 200
    finally:
        svc.close()

    from types import SimpleNamespace

    from runtime.backends.base import TensorSpec
    from runtime.features import model_regions

    def engine(shape, profile=None):
        image = SimpleNamespace(inputs=[TensorSpec("regions", np.dtype(np.float32), shape)])
        if profile is not None:
            image.profile = profile
        return SimpleNamespace(image=image)

    assert model_regions(engine(("N", "R", 12))) is None  # ONNX: dynamic
    assert model_regions(engine(("N", 36, 12))) == 36  # fixed in the graph
    assert model_regions(engine((-1, -1, 12), {"regions": {"min": [1, 36, 12], "max": [64, 36, 12]}})) == 36  # a plan


@pytest.mark.parametrize(
    "body,status,message",
    [
        (npy_header((10**12, 5, 12)) + b"\0" * 64, 400, "declares shape (1000000000000, 5, 12)"),
        (npy_header((2, 5, 12)) + np.ones((1, 5, 12), np.float32).tobytes(), 400, "the body holds 240 bytes"),
        (npy_header((1, 5, 12)) + np.ones((1, 5, 12), np.float32).tobytes() + b"x", 400, "holds 241 bytes"),
        (b"not an npy", 400, "do not start with the .npy magic string"),
        (b"\x93NUMPY\x01\x00\xff\xff{garbage", 400, "header is unreadable"),
    ],
    ids=["terabytes", "short", "long", "not-npy", "bad-header"],
)
def test_npy_header_is_checked_against_the_body_before_allocating(service, body, status, message):
    r = request(service, "POST", IMAGES + "?k=2", content=body, headers=OCTET)
    assert r.status_code == status, r.text
    assert r.json()["field"] == "body" and message in r.json()["error"]
    assert "pickle" not in r.json()["error"]


def test_npy_body_is_a_view_and_searches_like_json(service):
    regions = random_regions(2, seed=5)
    fortran = np.asfortranarray(regions.astype(">f8"))  # another byte order and layout
    a = request(service, "POST", IMAGES + "?k=4", content=npy_bytes(fortran), headers=OCTET)
    b = request(service, "POST", IMAGES, json={"queries": regions.tolist(), "k": 4})
    assert a.status_code == b.status_code == 200 and a.json()["ids"] == b.json()["ids"]


@pytest.mark.parametrize(
    "url,body,field",
    [
        (TEXT, b'{"queries": ["dog \\ud800"]}', "queries[0]"),
        ("/v1/gallery/captions", b'{"captions": ["dog", "a cat \\udfff ."]}', "captions[1]"),
        (
            "/v1/gallery/images",
            b'{"names": ["a\\ud800"], "features": ' + json.dumps(np.ones((1, 5, 12)).tolist()).encode() + b"}",
            "names[0]",
        ),
    ],
    ids=["search", "captions", "names"],
)
def test_text_that_is_not_utf8_is_refused_and_never_stored(engine_t2i, gallery, tmp_path, url, body, field):
    svc = local_service(engine_t2i, copy_gallery(gallery, tmp_path / "g"))
    try:
        r = request(svc, "POST", url, content=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert "lone surrogate" in r.json()["error"]
        assert request(svc, "GET", "/readyz").json() == {"status": "ready", "images": N_IMAGES, "captions": N_CAPTIONS}
        r = request(
            svc,
            "POST",
            "/v1/gallery/images?names=" + json.dumps(["b\ud800"]),
            content=npy_bytes(random_regions(1)),
            headers=OCTET,
        )
        assert r.status_code == 422 and r.json()["field"] == "names[0]", r.text
    finally:
        svc.close()


@pytest.mark.parametrize(
    "k,received",
    [
        (b"NaN", "NaN"),
        (b"Infinity", "Infinity"),
        (b"-Infinity", "-Infinity"),
        (b"1e400", "Infinity"),
        (b"1" * 5000, "Infinity"),
        (b'"5"', "string"),
        (b"[5]", "array"),
    ],
    ids=["nan", "inf", "-inf", "1e400", "5000-digits", "string", "array"],
)
def test_unrepresentable_k_is_a_json_422(service, k, received):
    r = request(service, "POST", TEXT, content=b'{"queries": ["dog"], "k": ' + k + b"}")
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["field"] == "k" and r.json()["received"] == received
    assert '\\"' not in r.text  # no JSON-quoted string echoed back


@pytest.mark.parametrize(
    "url,kwargs,status,field",
    [
        (IMAGES, dict(content=npy_bytes(np.ones((1, 5, 11), np.float32)), headers=OCTET), 422, "queries"),
        (IMAGES, dict(content=npy_bytes(np.ones((5, 12), np.float32)), headers=OCTET), 422, "queries"),
        (IMAGES, dict(content=b'{"queries": [[[NaN' + b", 1.0" * 11 + b"]]]}"), 422, "queries"),
        (
            "/v1/gallery/images",
            dict(content=json.dumps({"features": [[[float("nan")] * 12] * 5], "names": ["a"]}).encode()),
            422,
            "features",
        ),
        ("/v1/gallery/images", dict(json={"features": [[[1.0] * 11] * 5], "names": ["a"]}), 422, "features"),
        ("/v1/gallery/images", dict(json={"features": [[[1.0] * 12] * 2], "names": ["a"]}), 409, "features"),
        ("/v1/gallery/images", dict(json={"features": [[[1.0] * 12] * 5]}), 409, "names"),
        ("/v1/gallery/captions", dict(json={"captions": ["dog " * 40]}), 422, "captions[0]"),  # over max_words
        (TEXT, dict(json={"queries": ["a", "dog " * 30]}), 422, "queries[1]"),
    ],
    ids=["npy-width", "npy-2d", "nan-search", "nan-append", "append-width", "append-regions", "names", "tokens", "q"],
)
def test_every_error_names_its_field(service, url, kwargs, status, field):
    r = request(service, "POST", url, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field), r.text


def test_a_corrupted_gallery_is_a_logged_500(engine_t2i, gallery, tmp_path, caplog):
    folder = copy_gallery(gallery, tmp_path / "g")
    svc = local_service(engine_t2i, folder)
    try:
        images = np.load(folder / "images" / "images.1.npy", mmap_mode="r+")
        images[3] = np.nan
        images.flush()
        del images
        with caplog.at_level(logging.ERROR, logger="runtime.service.app"):
            r = request(svc, "POST", TEXT, json={"queries": ["dog"], "k": 5})
        assert r.status_code == 500 and "corrupted" in r.json()["error"], r.text
        assert str(folder / "images") not in r.text  # the path is for the log, not the client
        assert any(str(folder / "images") in rec.getMessage() for rec in caplog.records)
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- off the event loop


def test_large_json_bodies_are_parsed_in_a_worker_process(engine_t2i, gallery, monkeypatch):
    """A 24 MB JSON body held the event loop (and /healthz) for seconds: the C scanner and the cyclic GC over
    its millions of objects hold the GIL. Parsed in a worker process, the loop only waits for the result."""
    from runtime.service.app import SMALL_BODY, Parsers

    calls = []
    real = Parsers.run

    async def run(self, fn, *args):
        calls.append((fn.__name__, len(args[0])))
        return await real(self, fn, *args)

    monkeypatch.setattr(Parsers, "run", run)
    service = local_service(engine_t2i, gallery)
    queries = random_regions(8, seed=3, r=60)  # about 15 KB of JSON per image
    big = json.dumps({"queries": queries.tolist(), "k": 3}).encode()
    assert len(big) > SMALL_BODY
    ok = request(service, "POST", IMAGES, content=big)
    bad = request(service, "POST", IMAGES, content=big.replace(b'"k": 3', b'"k": NaN'))  # ApiError from the worker
    small = request(service, "POST", IMAGES, json={"queries": queries[:1, :2].tolist(), "k": 3})
    assert (
        ok.status_code == 200
        and ok.json()["ids"]
        == request(service, "POST", IMAGES + "?k=3", content=npy_bytes(queries), headers=OCTET).json()["ids"]
    )
    assert bad.status_code == 422 and bad.json() == {
        "error": "k: expected a positive integer, received number NaN",
        "field": "k",
        "received": "NaN",
    }
    assert small.status_code == 200
    assert calls == [("parse_search_images", len(big)), ("parse_search_images", len(big) + 2)]  # not the small
    # body nor the .npy body: those are parsed in place
    service.close()


def test_a_slow_body_times_out_with_408(engine_t2i, gallery):
    svc = local_service(engine_t2i, gallery, Settings(limits=Limits(body_timeout_s=0.3)))

    async def body(client):
        async def chunks():
            yield b'{"queries": '
            await asyncio.sleep(1.0)
            yield b'["dog"]}'

        return await client.post(TEXT, content=chunks(), headers={"Content-Type": "application/json"})

    try:
        r = run_client(svc, body)
        assert r.status_code == 408 and r.json()["field"] == "body" and "0.3 s" in r.json()["error"]
        assert r.headers["connection"] == "close"
    finally:
        svc.close()


def test_shutdown_abandons_bodies_still_arriving(engine_t2i, gallery):
    import httpx

    from runtime.service.app import create_app

    svc = local_service(engine_t2i, gallery)
    app = create_app(svc)

    async def main():
        async def chunks():
            yield b'{"queries": '
            await asyncio.sleep(30)
            yield b'["dog"]}'

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://scan.test", timeout=60) as client:
            pending = asyncio.ensure_future(
                client.post(TEXT, content=chunks(), headers={"Content-Type": "application/json"})
            )
            while not app.state.reads.waiting:
                await asyncio.sleep(0.01)
            app.state.reads.stop()
            return await asyncio.wait_for(pending, 5)

    try:
        r = asyncio.run(main())
        assert r.status_code == 503 and "shutting down" in r.json()["error"] and r.headers["retry-after"] == "1"
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------- API


def test_openapi_documents_bodies_parameters_and_errors(service):
    spec = request(service, "GET", "/openapi.json").json()
    paths = spec["paths"]
    images = paths[IMAGES]["post"]
    assert [p["name"] for p in images["parameters"]] == ["k"]
    assert [p["name"] for p in paths["/v1/gallery/images"]["post"]["parameters"]] == ["names"]
    assert images["requestBody"]["content"]["application/json"]["schema"]["required"] == ["queries"]
    assert "application/octet-stream" in images["requestBody"]["content"]
    features = paths["/v1/gallery/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(features["properties"]) == {"features", "names"} and features["required"] == ["features"]
    for path, codes in ((TEXT, {"400", "413", "422", "503"}), ("/v1/gallery/captions", {"401", "409", "422"})):
        responses = paths[path]["post"]["responses"]
        assert codes <= set(responses)
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AppendResult")
    assert paths[TEXT]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SearchResults"
    )
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {
        "error",
        "field",
        "limit",
        "received",
        "committed",
    }
    docs = request(service, "GET", "/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # works offline: nothing from a CDN
    assert request(service, "GET", "/redoc").status_code == 404


def test_access_log_is_on_by_default(engine_t2i, gallery, caplog):
    from runtime.service.app import create_app

    svc = local_service(engine_t2i, gallery)
    try:
        for access_log, expected in ((True, 1), (False, 0)):
            caplog.clear()

            app = create_app(svc, access_log=access_log)

            async def main(app=app):
                import httpx

                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://scan.test") as client:
                    return await client.get("/healthz")

            with caplog.at_level(logging.INFO, logger="runtime.service.app"):
                assert asyncio.run(main()).status_code == 200
            lines = [r for r in caplog.records if r.levelno == logging.INFO and "GET /healthz 200" in r.getMessage()]
            assert len(lines) == expected
    finally:
        svc.close()


def test_info_shows_paths_only_with_the_token(engine_t2i, gallery):
    svc = local_service(engine_t2i, gallery, token="a-long-enough-token")
    try:
        hidden = request(svc, "GET", "/v1/info").json()
        shown = request(svc, "GET", "/v1/info", headers={"Authorization": "Bearer a-long-enough-token"}).json()
        assert hidden["engine"] is None and hidden["gallery"] is None
        assert shown["engine"] == str(engine_t2i) and shown["gallery"] == str(gallery)
        assert str(gallery) not in json.dumps(hidden) and hidden["galleries"] == shown["galleries"]
    finally:
        svc.close()
    open_svc = local_service(engine_t2i, gallery)  # no token: nothing to hide from
    try:
        assert request(open_svc, "GET", "/v1/info").json()["gallery"] == str(gallery)
    finally:
        open_svc.close()


def test_gallery_files_share_one_mode(engine_t2i, gallery, tmp_path):
    folder = copy_gallery(gallery, tmp_path / "g")
    svc = local_service(engine_t2i, folder)
    try:
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a dog ."]})
        assert r.status_code == 200
    finally:
        svc.close()
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (folder / "captions").iterdir() if ".2." in p.name}
    modes["gallery.json"] = oct((folder / "captions" / "gallery.json").stat().st_mode & 0o777)
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
