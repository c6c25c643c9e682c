"""Dynamic batching: what is merged, that a result never depends on its batch-mates, many concurrent clients."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.options import EngineOptions
from runtime.searcher import Searcher
from runtime.service.batcher import Batcher, BatcherClosed, QueueFull
from runtime.service.settings import Batching, Settings
from runtime.service.types import Hits
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import build_gallery, local_service, run_client


class Qs(tuple):
    """Stand-in for prepared queries (runtime.searcher.Queries): a batch joins its requests' with concat."""

    @classmethod
    def concat(cls, parts):
        return cls(q for p in parts for q in p)


class Recorder:
    """execute() that scores query q's candidate j as hash-like values, records batch sizes, can be held."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, direction, queries, k):
        self.gate.wait(30)
        self.batches.append([q if isinstance(q, str) else q.shape for q in queries])
        return solo(direction, queries, k)


def solo(direction, queries, k):
    """A deterministic 'search': each query's results depend on the query alone."""
    rows = []
    for q in queries:
        seed = abs(hash(q if isinstance(q, str) else q.tobytes())) % (2**32)
        rows.append(np.random.default_rng(seed).permutation(50)[:k])
    ids = np.array(rows, np.int64)
    return Hits(
        -np.sort(-np.random.default_rng(0).random(ids.shape)).astype(np.float32) + ids * 0,
        ids,
        [[str(i) for i in r] for r in ids],
    )


def test_batches_merge_up_to_max_batch_and_split_back():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=4, max_delay_ms=200, max_queue=100))
    futures = [b.submit("text_to_image", Qs([f"q{i}"]), k=3) for i in range(10)]  # queued before the worker runs
    b.start()
    rec.gate.set()
    results = [f.result(10) for f in futures]
    b.close()
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert [q for batch in rec.batches for q in batch] == [f"q{i}" for i in range(10)]  # FIFO, none lost or repeated
    for i, r in enumerate(results):
        alone = solo("text_to_image", [f"q{i}"], 3)
        assert r.ids.tolist() == alone.ids.tolist() and r.names == alone.names


def test_each_request_gets_its_own_k_and_rows():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=16, max_delay_ms=200))
    jobs = [(["a", "b"], 2), (["c"], 7), (["d", "e", "f"], 1)]
    futures = [b.submit("text_to_image", Qs(q), k) for q, k in jobs]
    b.start()
    rec.gate.set()
    for (q, k), f in zip(jobs, futures):
        r = f.result(10)
        assert r.ids.shape == (len(q), k) and len(r.names[0]) == k
        assert r.ids.tolist() == solo("text_to_image", q, k).ids.tolist()
    b.close()
    assert len(rec.batches) == 1


def test_only_compatible_requests_merge():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=16, max_delay_ms=100))
    f = [
        b.submit("image_to_text", Qs(np.zeros((1, 3, 4), np.float32)), 2, key=3),
        b.submit("text_to_image", Qs(["a"]), 2),
        b.submit("image_to_text", Qs(np.ones((2, 5, 4), np.float32)), 2, key=5),
        b.submit("image_to_text", Qs(np.ones((1, 3, 4), np.float32)), 2, key=3),
        b.submit("text_to_image", Qs(["b"] * 20), 2),
    ]  # larger than max_batch: runs alone, whole
    b.start()
    rec.gate.set()
    assert [x.result(10).ids.shape[0] for x in f] == [1, 1, 2, 1, 20]
    b.close()
    shapes = sorted(sorted(map(str, batch)) for batch in rec.batches)
    assert ["(3, 4)", "(3, 4)"] in shapes and ["(5, 4)", "(5, 4)"] in shapes
    assert ["a"] in shapes and ["b"] * 20 in shapes and len(rec.batches) == 4


def test_queue_is_bounded_and_close_drains():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=2, max_delay_ms=0, max_queue=3))
    b.start()
    futures = [b.submit("text_to_image", Qs(["first"]), 1)]
    deadline = time.monotonic() + 10
    while b.depth and time.monotonic() < deadline:  # the worker holds 'first' (blocked in execute)
        time.sleep(0.005)
    futures += [b.submit("text_to_image", Qs([f"q{i}"]), 1) for i in range(3)]
    with pytest.raises(QueueFull, match="max_queue=3") as e:
        b.submit("text_to_image", Qs(["one too many"]), 1)
    assert e.value.retry_after > 0
    rec.gate.set()
    b.close()
    assert all(f.done() and f.exception() is None for f in futures)  # drained, none dropped
    with pytest.raises(BatcherClosed):
        b.submit("text_to_image", Qs(["late"]), 1)


def test_a_cancelled_request_is_not_computed():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=1, max_delay_ms=0))
    b.start()
    first = b.submit("text_to_image", Qs(["first"]), 1)
    second = b.submit("text_to_image", Qs(["gone"]), 1)
    assert second.cancel()
    rec.gate.set()
    first.result(10)
    b.close()
    assert ["gone"] not in rec.batches


NEVER = 600_000  # ms: a delay no test could sit out, so a test that ends did not wait for it


def _held(b: Batcher, rec: Recorder, first: str) -> object:
    """Submit ``first`` and return once the worker holds it (blocked in execute): the worker is busy."""
    future = b.submit("text_to_image", Qs([first]), 1)
    deadline = time.monotonic() + 10
    while b.depth and time.monotonic() < deadline:
        time.sleep(0.005)
    assert b.depth == 0
    return future


def test_an_idle_worker_runs_a_lone_request_at_once():
    """With the worker idle and nothing else queued, a request does not wait max_delay_ms for batch-mates: with a
    10-minute delay, its answer comes (a wait for the delay would time the result out)."""
    rec = Recorder()
    b = Batcher(rec, Batching(max_batch=32, max_delay_ms=NEVER))
    b.start()
    for i in range(3):  # each request alone, one after another: every one finds the worker idle
        assert b.submit("text_to_image", Qs([f"q{i}"]), 2).result(10).ids.shape == (1, 2)
    b.close()
    assert rec.batches == [["q0"], ["q1"], ["q2"]]


def test_a_batch_forms_while_the_worker_is_busy():
    """Requests arriving while a batch runs are the next batch, whole, run as soon as the worker is free (no
    wait for the delay either: they are all there is)."""
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=32, max_delay_ms=NEVER))
    b.start()
    first = _held(b, rec, "first")
    later = [b.submit("text_to_image", Qs([f"q{i}"]), 1) for i in range(5)]
    rec.gate.set()
    first.result(10)
    assert [f.result(10).ids.shape for f in later] == [(1, 1)] * 5
    b.close()
    assert rec.batches == [["first"], [f"q{i}" for i in range(5)]]


def test_after_a_large_batch_the_worker_waits_for_the_expected_batch_mates():
    """After a batch of 4, a lone request waits (the 10-minute delay, never reached) until 3 more have come:
    one batch of 4 again, not a batch of 1 followed by a batch of 3."""
    rec = Recorder()
    b = Batcher(rec, Batching(max_batch=32, max_delay_ms=NEVER))
    four = [b.submit("text_to_image", Qs([f"a{i}"]), 1) for i in range(4)]
    b.start()
    [f.result(10) for f in four]
    lone = b.submit("text_to_image", Qs(["b0"]), 1)
    assert not lone.done()  # it waits for batch-mates: it cannot have run alone
    rest = [b.submit("text_to_image", Qs([f"b{i}"]), 1) for i in range(1, 4)]
    [f.result(10) for f in [lone, *rest]]
    b.close()
    assert rec.batches == [[f"a{i}" for i in range(4)], [f"b{i}" for i in range(4)]]


def test_each_request_is_told_its_queue_wait():
    """The hits carry the seconds a request waited in the queue (its batch's stages come from execute)."""
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, Batching(max_batch=32, max_delay_ms=0))
    b.start()
    first = _held(b, rec, "first")
    t0 = time.monotonic()
    second = b.submit("text_to_image", Qs(["second"]), 1)
    time.sleep(0.05)  # the second request waits at least this long: the worker is held
    rec.gate.set()
    waited = second.result(10).seconds["queue"]
    assert 0.05 <= waited <= time.monotonic() - t0
    assert first.result(10).seconds["queue"] >= 0
    b.close()


# ---------------------------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def galleries(small_engines, tmp_path_factory):
    return {
        mode: build_gallery(path, tmp_path_factory.mktemp(f"batching_{mode}")) for mode, path in small_engines.items()
    }


def _reference(engine_path, gallery):
    engine = ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime", threads=1))
    return engine, Searcher(
        engine, images=ImageGallery.load(gallery / "images"), captions=CaptionGallery.load(gallery / "captions")
    )


def _batch_sizes(metrics: str, kind: str) -> tuple[float, float]:
    """(batches, queries) executed, from the Prometheus exposition."""
    count = total = 0.0
    for line in metrics.splitlines():
        if line.startswith(f'scan_batch_size_count{{kind="{kind}"}}'):
            count = float(line.split()[-1])
        if line.startswith(f'scan_batch_size_sum{{kind="{kind}"}}'):
            total = float(line.split()[-1])
    return count, total


@pytest.mark.parametrize("mode", ["t2i", "i2t"])
def test_batched_results_equal_each_request_alone(mode, small_engines, galleries):
    """Same ids, scores within 1e-6, whatever the batch-mates (lengths, k, number of queries) - both directions."""
    engine_path, gallery = small_engines[mode], galleries[mode]
    svc = local_service(engine_path, gallery, Settings(Batching(max_batch=16, max_delay_ms=150)))
    texts = random_captions(24, seed=5)
    text_jobs = [(texts[i : i + 1 + i % 3], 1 + (i * 7) % 45) for i in range(0, 24, 2)]  # 1-3 captions, k 1..44
    image_jobs = [(random_regions(1 + i % 3, seed=30 + i), 1 + (i * 11) % 65) for i in range(10)]

    async def body(client):
        t = [client.post("/v1/search/text", json={"queries": q, "k": k}) for q, k in text_jobs]
        i = [client.post("/v1/search/images", json={"queries": q.tolist(), "k": k}) for q, k in image_jobs]
        out = await asyncio.gather(*t, *i)
        return out, (await client.get("/metrics")).text

    engine, searcher = _reference(engine_path, gallery)
    try:
        responses, metrics = run_client(svc, body)
        for (q, k), r in zip(text_jobs + image_jobs, responses):
            assert r.status_code == 200, r.text
            scores, ids = searcher.search(q, k)  # the request alone
            assert r.json()["ids"] == ids.tolist()
            got = np.array([[np.nan if s is None else s for s in row] for row in r.json()["scores"]], np.float32)
            np.testing.assert_allclose(got, np.where(ids < 0, np.nan, scores), rtol=0, atol=1e-6)
        for kind, jobs in (("text", text_jobs), ("images", image_jobs)):
            batches, queries = _batch_sizes(metrics, kind)
            assert queries == sum(len(q) for q, _ in jobs)
            assert batches < len(jobs)  # requests really were merged: the comparison above is not vacuous
    finally:
        svc.close()
        engine.close()


def test_many_concurrent_clients_get_exactly_their_serial_answers(small_engines, galleries):
    """64 clients x 4 requests: every answer equals the serial one; none lost, none answered twice."""
    engine_path, gallery = small_engines["t2i"], galleries["t2i"]
    svc = local_service(engine_path, gallery, Settings(Batching(max_batch=8, max_delay_ms=2, workers=2)))
    queries = random_captions(256, seed=9)

    async def body(client):
        async def one_client(c):
            out = []
            for j in range(4):
                q = queries[c * 4 + j]
                r = await client.post("/v1/search/text", json={"queries": [q], "k": 5})
                out.append((q, r))
            return out

        results = await asyncio.gather(*[one_client(c) for c in range(64)])
        return [x for per_client in results for x in per_client], (await client.get("/metrics")).text

    engine, searcher = _reference(engine_path, gallery)
    try:
        answered, metrics = run_client(svc, body)
        assert len(answered) == 256
        scores, ids = searcher.search(queries, 5)  # serial reference, one call
        for n, (_, r) in enumerate(answered):
            assert r.status_code == 200
            assert r.json()["ids"] == [ids[n].tolist()]
            np.testing.assert_allclose(r.json()["scores"][0], scores[n], rtol=0, atol=1e-6)
        batches, total = _batch_sizes(metrics, "text")
        assert total == 256 and batches < 256
        assert 'scan_requests_total{endpoint="/v1/search/text",status="200"} 256.0' in metrics
    finally:
        svc.close()
        engine.close()
