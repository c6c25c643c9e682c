"""runtime/client.py: the same results as the in-process searcher through a real uvicorn on a loopback port;
retries that honour Retry-After and keep one Idempotency-Key per write (against a stand-in transport)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="needs the 'serve' extra")
import uvicorn

from runtime.client import SearchClient, ServiceError
from runtime.engine import ScanEngine
from runtime.gallery import CaptionGallery, ImageGallery
from runtime.options import EngineOptions
from runtime.searcher import Searcher
from runtime.service.app import create_app
from runtime.service.types import Appended
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import N_CAPTIONS, N_IMAGES, copy_gallery, local_service

QUERIES = ["a dog on the beach .", "red cat", "the man running on grass", "blue woman"]
TOKEN = "s3cret"


@contextlib.contextmanager
def serving(engine_path, folder) -> Iterator[str]:
    """A service over ``folder`` on 127.0.0.1, a port the OS picks, in a thread of this process; its URL."""
    service = local_service(engine_path, folder, token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            thread.join(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(engine_t2i, gallery):
    with serving(engine_t2i, gallery) as url:
        yield url


def _open(engine_path) -> ScanEngine:
    return ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime", threads=1))  # as local_service does


def _searcher(engine: ScanEngine, gallery) -> Searcher:
    images = ImageGallery.load(gallery / "images", engine.manifest.image_encoder_id)
    captions = CaptionGallery.load(gallery / "captions", engine.manifest.text_encoder_id)
    return Searcher(engine, images=images, captions=captions)


def test_results_equal_the_in_process_searcher(url, engine_t2i, gallery):
    regions = random_regions(3, seed=7)
    with SearchClient(url) as client, _open(engine_t2i) as engine:
        searcher = _searcher(engine, gallery)
        for queries, k in ((QUERIES, 5), (regions, 4), (QUERIES[:1], N_IMAGES + 3)):
            scores, ids = client.search(queries, k)
            want_scores, want_ids = searcher.search(queries, k)
            assert scores.dtype == np.float32 and ids.dtype == np.int64
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)  # -inf past the gallery included
        hits = client.hits(QUERIES[:2], 3)
        assert hits.names == [[f"img{i}" for i in row] for row in hits.ids.tolist()]
        info = client.info()
        assert info["ready"] is True and info["auth"] == {"writes_need_token": True}


def test_appends_need_the_token_and_are_searchable(engine_t2i, gallery, tmp_path):
    folder = copy_gallery(gallery, tmp_path / "gallery")
    with serving(engine_t2i, folder) as url:
        with SearchClient(url) as anonymous, pytest.raises(ServiceError) as e:
            anonymous.add_captions(["a red dog ."])
        assert e.value.status == 401 and "Authorization" in e.value.message
        with SearchClient(url, token=TOKEN) as client:
            out = client.add_images(random_regions(2, seed=11), names=["new0", "new1"])
            assert out == Appended(added=2, first_id=N_IMAGES, count=N_IMAGES + 2)
            assert client.add_captions(random_captions(3, seed=12)) == Appended(3, N_CAPTIONS, N_CAPTIONS + 3)
            hits = client.hits(QUERIES, N_IMAGES + 2)
            assert {"new0", "new1"} <= {name for row in hits.names for name in row}
            with _open(engine_t2i) as engine:
                scores, ids = _searcher(engine, folder).search(QUERIES, N_IMAGES + 2)
            np.testing.assert_array_equal(hits.ids, ids)
            np.testing.assert_array_equal(hits.scores, scores)
            with pytest.raises(ServiceError) as e:
                client.search(QUERIES, 0)
            assert e.value.status == 422 and e.value.body["field"] == "k"


# ---------------------------------------------------------------------------------------------- retries


class Script:
    """A stand-in server: answers each request with the next response of ``responses``, recording requests."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        out = self.responses.pop(0)
        if isinstance(out, Exception):
            raise out
        return out


OK_HITS = {"ids": [[1, -1]], "scores": [[0.5, None]], "names": [["a", None]]}
OK_APPEND = {"added": 1, "ids": [7], "count": 8}


def _client(script: Script, sleeps: list[float], **kw) -> SearchClient:
    return SearchClient("http://scan.test", transport=httpx.MockTransport(script), sleep=sleeps.append, **kw)


def test_503_is_retried_after_retry_after():
    busy = httpx.Response(503, headers={"Retry-After": "3"}, json={"error": "overloaded"})
    script, sleeps = Script(busy, busy, httpx.Response(200, json=OK_HITS)), []
    scores, ids = _client(script, sleeps).search(["a dog"], 2)
    assert sleeps == [3.0, 3.0] and len(script.requests) == 3
    assert ids.tolist() == [[1, -1]] and scores[0, 0] == np.float32(0.5) and scores[0, 1] == -np.inf


def test_backoff_without_retry_after_doubles_and_gives_up_with_the_error():
    busy = httpx.Response(503, json={"error": "not ready: loading"})
    script, sleeps = Script(busy, busy, busy), []
    with pytest.raises(ServiceError) as e:
        _client(script, sleeps, retries=2, backoff=1.0).info()
    assert e.value.status == 503 and e.value.message == "not ready: loading"
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_a_write_keeps_one_idempotency_key_across_retries():
    busy = httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "not ready"})
    script, sleeps = Script(httpx.ConnectError("refused"), busy, httpx.Response(200, json=OK_APPEND)), []
    client = _client(script, sleeps)
    assert client.add_captions(["a red car"]) == Appended(added=1, first_id=7, count=8)
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(script.requests) == 3 and len(keys) == 1
    script2 = Script(httpx.Response(200, json=OK_APPEND))
    _client(script2, []).add_images(np.zeros((1, 2, 3), np.float32), names=["x"])
    assert script2.requests[0].headers["Idempotency-Key"] not in keys  # a new write, a new key
    assert script2.requests[0].headers["Content-Type"] == "application/octet-stream"
    assert script2.requests[0].url.params["names"] == '["x"]'


def test_a_write_is_not_resent_after_the_connection_dropped_mid_request():
    script = Script(httpx.ReadError("connection reset"), httpx.Response(200, json=OK_APPEND))
    with pytest.raises(httpx.ReadError):
        _client(script, []).add_captions(["a red car"])
    assert len(script.requests) == 1
    search = Script(httpx.ReadError("connection reset"), httpx.Response(200, json=OK_HITS))
    _client(search, []).search(["a dog"], 2)  # a search changes nothing: retried
    assert len(search.requests) == 2


def test_token_is_sent_and_bad_queries_fail_before_sending():
    script = Script(httpx.Response(200, json=OK_HITS))
    client = SearchClient("http://scan.test", token="t", transport=httpx.MockTransport(script))
    client.search("a dog", 2)  # one caption, as Searcher.search takes it
    assert script.requests[0].headers["Authorization"] == "Bearer t"
    with pytest.raises(TypeError, match="expected strings"):
        client.search(["a dog", 3], 2)
    with pytest.raises(TypeError, match="n, regions, img_dim"):
        client.search(np.zeros((2, 3), np.float32), 2)
    assert len(script.requests) == 1
