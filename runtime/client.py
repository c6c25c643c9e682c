"""A Python client for the search service (``runtime/serve.py``), with the in-process searcher's contract.

    from runtime.client import SearchClient

    with SearchClient("http://127.0.0.1:8000", token=None) as client:
        scores, ids = client.search(["a dog on the beach"], k=10)  # text -> image
        scores, ids = client.search(regions, k=5)  # float32 (n, R, img_dim) -> captions
        client.add_captions(["a red car"])  # writes need the service's token

As with ``Searcher.search``: float32 scores ``(n, k)`` descending and int64 ids, ``-1`` (score ``-inf``) past
the gallery. Region queries and appended features travel as ``.npy`` bodies (exact float32, a quarter of
JSON's size).

Retries: a 503 (not ready, queue full, a shard restarting) is retried after the server's ``Retry-After``, or
with exponential back-off when it gives none, up to ``retries`` times; so is a connection that could not be
made. Searches are also retried after a connection lost mid-request (they change nothing); writes are not,
since the server may have committed them. Every write carries an ``Idempotency-Key`` header, the same on
each retry of that write, so a server that records keys can apply it once.
"""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np

from runtime.service.types import Appended, Hits

NPY_HEADERS = {"Content-Type": "application/octet-stream"}
RETRY_STATUSES = frozenset({503})


class ServiceError(Exception):
    """The service answered with an error status; ``message`` is its ``error`` text (it names the bad field)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _regions(queries: Any, what: str) -> np.ndarray:
    arr = np.asarray(queries)
    if arr.dtype.kind not in "iuf" or arr.ndim != 3:
        raise TypeError(f"{what}: expected a float32 array (n, regions, img_dim), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _captions(queries: Any, what: str) -> list[str]:
    if isinstance(queries, str):
        return [queries]
    out = list(queries)
    bad = next((q for q in out if not isinstance(q, str)), None)
    if bad is not None:
        raise TypeError(f"{what}: expected strings, got {type(bad).__name__} {bad!r}")
    return out


def _hits(body: dict[str, Any]) -> Hits:
    # JSON null is a -inf score (an id of -1, past the gallery); float32 round-trips through JSON's doubles.
    scores = np.array([[-np.inf if s is None else s for s in row] for row in body["scores"]], dtype=np.float32).reshape(
        len(body["ids"]), -1
    )
    ids = np.array(body["ids"], dtype=np.int64).reshape(scores.shape)
    return Hits(scores, ids, body["names"])


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by this service; back off instead
        return None


class SearchClient:
    """``scores, ids = client.search(queries, k)`` against a running service, like ``Searcher.search``.

    ``token``: the service's write token (``serve.py --token-file``), sent as ``Authorization: Bearer``.
    ``retries``: how many times a retryable failure is retried; ``backoff``: the first back-off in seconds,
    doubled each retry (with jitter) up to ``max_backoff``, used when the server sends no ``Retry-After``.
    ``transport``: an ``httpx`` transport (tests).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(f"retries, backoff and max_backoff must be >= 0, got {retries}, {backoff}, {max_backoff}")
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=headers, transport=transport)

    # ------------------------------------------------------------------------------------------ search

    def search(self, queries: Sequence[str] | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Captions (a list of str) search the image gallery; region features (n, R, img_dim) the captions."""
        hits = self.hits(queries, k)
        return hits.scores, hits.ids

    def hits(self, queries: Sequence[str] | np.ndarray, k: int = 10) -> Hits:
        """``search``'s scores and ids with the names the service returns (image names or caption texts)."""
        if isinstance(queries, np.ndarray):
            npy, params = _npy(_regions(queries, "queries")), {"k": k}
            body = self._call("POST", "/v1/search/images", write=False, content=npy, headers=NPY_HEADERS, params=params)
        else:
            payload = {"queries": _captions(queries, "queries"), "k": k}
            body = self._call("POST", "/v1/search/text", write=False, json=payload)
        return _hits(body)

    # ------------------------------------------------------------------------------------------ writes

    def add_images(self, regions: np.ndarray, names: Sequence[str] | None = None) -> Appended:
        """Append images (region features (n, R, img_dim)), with their names, to the image gallery."""
        params = {"names": json.dumps(list(names))} if names is not None else None
        npy = _npy(_regions(regions, "regions"))
        body = self._call("POST", "/v1/gallery/images", write=True, content=npy, headers=NPY_HEADERS, params=params)
        return self._appended(body)

    def add_captions(self, captions: Sequence[str]) -> Appended:
        """Append captions to the caption gallery."""
        payload = {"captions": _captions(captions, "captions")}
        body = self._call("POST", "/v1/gallery/captions", write=True, json=payload)
        return self._appended(body)

    @staticmethod
    def _appended(body: dict[str, Any]) -> Appended:
        ids = body["ids"]
        return Appended(added=body["added"], first_id=ids[0] if ids else body["count"], count=body["count"])

    # ------------------------------------------------------------------------------------------ the rest

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: model, galleries, backend, batching, limits, versions."""
        return self._call("GET", "/v1/info", write=False)

    def ready(self) -> bool:
        """Whether the service has loaded its engine and galleries (``GET /readyz``), without retrying."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        given = _retry_after(response) if response is not None else None
        if given is not None:
            return given
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def _call(self, method: str, path: str, *, write: bool, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        headers = dict(headers or {})
        if write:
            headers["Idempotency-Key"] = uuid.uuid4().hex  # the same key on every retry of this write
        # Never sent, so never applied: safe to retry even for a write.
        retryable: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
        if not write:
            retryable = (httpx.TransportError,)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, headers=headers, **kw)
            except retryable:
                if last:
                    raise
                self._sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                self._sleep(self._delay(attempt, response))
                continue
            if response.is_success:
                return response.json()
            try:
                body = response.json()
                message = body.get("error", response.text) if isinstance(body, dict) else response.text
            except ValueError:
                body, message = None, response.text
            raise ServiceError(response.status_code, message, body)
        raise AssertionError("unreachable")  # the last attempt returns or raises
