"""The FastAPI application of the search service: routes, status codes, error bodies, auth, body limits.

Every error is ``{"error": message}`` (plus ``field``/``limit``/``received`` when one input is at fault):
400 malformed body, 401 missing or wrong token, 404/405 unknown route, 408 body too slow, 409 no gallery
for that direction or a gallery conflict, 413 too large, 415 wrong Content-Type, 422 invalid value, 503 not
ready, queue full or shutting down (with ``Retry-After``), 500 an internal failure of that one request or a
corrupted gallery (logged; the server keeps serving).

Large JSON bodies are parsed in worker processes (``Parsers``) and captions checked in worker threads, so
/healthz answers while a 100k-caption append is checked; each body must arrive within ``body_timeout_s``,
and at shutdown the bodies still arriving are abandoned (``Reads.stop``) rather than waited for.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import multiprocessing
import os
import platform
import re
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import __version__
from runtime.features import FeatureError, model_regions
from runtime.gallery import GalleryError
from runtime.gallery.store import StorageError
from runtime.searcher import OutcomeUnknown, SearchError, ShardUnavailableError
from runtime.service import openapi as api
from runtime.service import page
from runtime.service import requests as rq
from runtime.service.batcher import BatcherClosed, QueueFull
from runtime.service.requests import ApiError
from runtime.service.service import NoGallery, NotReady, Service
from runtime.service.settings import DEFAULT_MAX_REGIONS
from runtime.service.types import Appended, Hits
from runtime.threads import Threads, blas_library
from runtime.tokenizer import TokenizerError
from runtime.topk import NonFiniteScore

logger = logging.getLogger(__name__)

ENDPOINTS = (
    "/v1/search/text",
    "/v1/search/images",
    "/v1/gallery/images",
    "/v1/gallery/captions",
    "/v1/info",
    "/v1/images",
    "/v1/explain",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
)
WRITE_PREFIX = "/v1/gallery/"
PATH_KEYS = ("engine", "gallery", "folder")  # the server's paths in /v1/info: shown only with the token
SMALL_BODY = 64 << 10  # JSON bodies up to this size are parsed on the event loop (a millisecond at most)
PARSERS = 2  # worker processes parsing the larger JSON bodies
# The tokenizer, the feature checks and the gallery start their messages with the input at fault.
_FIELD = re.compile(r"([a-z_]+(?:\[\d+\])?)[: ]")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    # scan-runtime's own: the code that runs (a clone's may differ from an installed copy's metadata)
    out = {"python": platform.python_version(), "scan-runtime": __version__}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "fastapi", "uvicorn"):
        v = _version(dist)
        if v is not None or dist in ("numpy", "fastapi", "uvicorn"):
            out[dist] = v
    return out


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"error": message, **{k: v for k, v in extra.items() if v is not None}}, status_code=status, headers=headers
    )


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _field(message: str) -> str | None:
    match = _FIELD.match(message)
    return match.group(1) if match else None


def _corrupted(e: BaseException) -> bool:
    """A score that is NaN or infinite comes from the gallery's cached arrays, never from the request."""
    while e is not None:
        if isinstance(e, NonFiniteScore):
            return True
        e = e.__cause__
    return False


async def _guard(endpoint: str, fn: Callable[[], Awaitable[Any]]) -> Response:
    """Run a handler body: client mistakes -> 4xx, overload -> 503, anything else -> 500 for this request only."""
    try:
        out = await fn()
        return out if isinstance(out, Response) else JSONResponse(out)
    except ApiError as e:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    except (TokenizerError, FeatureError, SearchError) as e:
        if _corrupted(e):
            logger.error("%s failed: the gallery is corrupted: %s", endpoint, e)
            return _error(500, "internal error: a gallery's cached arrays are corrupted; the server logged the details")
        return _error(422, str(e), field=_field(str(e)))
    except NoGallery as e:
        return _error(409, str(e))
    except StorageError as e:  # the server's disk refused the write (nothing of it remains)
        logger.error("%s: %s", endpoint, e)
        return _error(507 if e.full else 500, str(e))
    except OutcomeUnknown as e:  # no Retry-After: a blind retry could apply the write twice
        logger.error("%s: %s", endpoint, e)
        return _error(504, str(e), committed="unknown")
    except GalleryError as e:
        return _error(409, str(e), field=_field(str(e)))
    except NotReady as e:
        return _error(503, f"not ready: {e}", headers=_retry_after(1))
    except QueueFull as e:
        return _error(503, f"overloaded: {e}; retry later", headers=_retry_after(e.retry_after))
    except BatcherClosed as e:
        return _error(503, f"unavailable: {e}")
    except ShardUnavailableError as e:  # a shard is dead or restarting: the whole request fails, retry soon
        return _error(503, f"unavailable: {e}", headers=_retry_after(1))
    except Exception as e:  # an internal failure: this request fails, the server keeps serving
        logger.exception("%s failed: %s: %s", endpoint, type(e).__name__, e)
        return _error(500, f"internal error ({type(e).__name__}); the server logged the details")


def _key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(422, "Idempotency-Key: expected 1 to 200 characters", field="Idempotency-Key")
    return key


async def _write(append: Callable[..., Appended], *args: Any) -> Response:
    """Run an append in a worker thread to its end: a shutdown that cancels the request (``--grace-s``) does not
    abandon a write that may commit, so its answer is still the truth. A repeated key answers the first write's."""
    job = asyncio.ensure_future(run_in_threadpool(append, *args))
    while True:
        try:
            out = await asyncio.shield(job)
            break
        except asyncio.CancelledError:
            if job.cancelled():
                raise
            logger.warning("shutting down: finishing an append in progress before answering it")
    headers = {"Idempotent-Replayed": "true"} if out.repeated else None
    return JSONResponse(_appended_json(out), headers=headers)


def _appended_json(out: Appended) -> dict[str, Any]:
    return {"added": out.added, "ids": list(range(out.first_id, out.first_id + out.added)), "count": out.count}


def _hits_json(hits: Hits) -> dict[str, Any]:
    return {"ids": hits.ids.tolist(), "scores": rq.json_scores(hits.scores), "names": hits.names}


def _answer(service: Service, kind: str, parse: float, hits: Hits) -> Response:
    """The search's response; its stages' seconds (``parse``, the hits', serialising) go to the metrics."""
    t0 = time.perf_counter()
    response = JSONResponse(_hits_json(hits))
    service.monitoring.record_stages(kind, {"parse": parse, **hits.seconds, "serialise": time.perf_counter() - t0})
    return response


class Parsers:
    """Worker processes for large JSON bodies. In a thread, json's C scanner and the cyclic GC over the
    millions of objects a 24 MB array of numbers makes hold the GIL (the event loop) for up to seconds, and
    the objects leave the server's heap fragmented; a worker returns the checked arrays or raises ApiError."""

    def __init__(self, workers: int = PARSERS) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:  # spawned: forking a process that runs engine threads is unsafe
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=rq.parser_process,
                    initargs=(os.getpid(),),
                )
            return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:  # a worker died (killed for memory?): fail this request, start new workers
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            raise

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


class Reads:
    """The request bodies being received: ``stop`` (at shutdown) abandons them with 503, so that a slow client
    does not hold the server for its grace period."""

    def __init__(self) -> None:
        self.waiting: set[asyncio.Future] = set()
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for read in list(self.waiting):
            read.cancel()

    async def receive(self, receive, deadline: float, limit: float) -> dict:
        if self.stopping:
            raise _shutting_down()
        read = asyncio.ensure_future(receive())
        self.waiting.add(read)
        try:
            return await asyncio.wait_for(read, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"body: not received within {limit:g} s",
                field="body",
                headers={"Connection": "close"},
            ) from None
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            raise _shutting_down() from None
        finally:
            self.waiting.discard(read)


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        "unavailable: the server is shutting down before the request body arrived",
        headers={"Connection": "close", **_retry_after(1)},
    )


class _Guard:
    """ASGI middleware: body size limits (Content-Length and while streaming), the body deadline, per-request
    metrics and the access log."""

    def __init__(self, app, service: Service, reads: Reads, access_log: bool) -> None:
        self.app = app
        self.service = service
        self.reads = reads
        self.access_log = access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        limits = self.service.settings.limits
        limit = limits.max_append_bytes if path.startswith(WRITE_PREFIX) else limits.max_body_bytes
        t0 = time.perf_counter()
        deadline = time.monotonic() + limits.body_timeout_s
        status = 500
        api = path.startswith("/v1/")
        if api:
            self.service.monitoring.in_flight.inc()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _error(
                    413,
                    f"body: at most {limit} bytes, received {int(declared)}",
                    field="body",
                    limit=limit,
                    received=int(declared),
                )(scope, receive, send_status)
                return
            received, complete = 0, False

            async def counted_receive():
                nonlocal received, complete
                if complete:  # after the body: only a disconnect can come, whenever it does
                    return await receive()
                message = await self.reads.receive(receive, deadline, limits.body_timeout_s)
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    complete = not message.get("more_body", False)
                    if received > limit:
                        raise ApiError(
                            413, f"body: at most {limit} bytes, received more than {limit}", field="body", limit=limit
                        )
                return message

            await self.app(scope, counted_receive, send_status)
        finally:
            if api:
                self.service.monitoring.in_flight.dec()
            seconds = time.perf_counter() - t0
            self.service.monitoring.record_request(endpoint, status, seconds)
            # 503 from /readyz while loading is its job, not an error
            if status >= 500 and path != "/readyz":
                level = logging.WARNING
            else:
                level = logging.INFO if self.access_log else logging.DEBUG
            if logger.isEnabledFor(level):
                client = scope.get("client") or ("-", 0)
                logger.log(
                    level, "%s:%s %s %s %d %.1f ms", client[0], client[1], scope["method"], path, status, seconds * 1000
                )


def create_app(service: Service, access_log: bool = True) -> FastAPI:
    """The application for ``service``; its lifespan starts loading and, at shutdown, drains the batcher.
    ``app.state.reads.stop()`` abandons the bodies still arriving (runtime/service/server.py calls it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            parsers.close()
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="SCAN search",
        version=__version__,
        lifespan=lifespan,
        description="Top-k image-text search with an exported SCAN model; queries of concurrent requests are batched.",
        docs_url=None,  # served below from the package: the default page loads Swagger UI from a CDN
        redoc_url=None,
    )
    app.state.reads = Reads()
    app.add_middleware(_Guard, service=service, reads=app.state.reads, access_log=access_log)
    limits = service.settings.limits
    parsers = Parsers()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", headers=exc.headers)

    def _has_token(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), service.token.encode())

    def _authorize(request: Request) -> None:
        if service.token is not None and not _has_token(request):
            raise ApiError(
                401,
                "Authorization: gallery writes need 'Authorization: Bearer <token>' (missing or wrong token)",
                field="Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def max_regions() -> int:
        """--max-regions, else the model's fixed count (the smallest of the members'), else the default."""
        if limits.max_regions is not None:
            return limits.max_regions
        engines = getattr(getattr(service.executor, "searcher", None), "engines", ())
        known = [r for r in map(model_regions, engines) if r is not None]
        return min(known) if known else DEFAULT_MAX_REGIONS

    async def parsed(request: Request, parse: Callable[..., Any], *args: Any) -> Any:
        """``parse(body, content_type, *args)``: a large JSON body in a worker process, else here (an .npy body
        becomes a view of its bytes, in microseconds)."""
        body = await request.body()
        content_type = request.headers.get("content-type")
        if len(body) <= SMALL_BODY or rq.media_type(content_type) == rq.NPY:
            return parse(body, content_type, *args)
        return await parsers.run(parse, body, content_type, *args)

    def threads_info() -> dict[str, Any]:
        """The thread budgets in use (runtime/threads.py): ONNX Runtime's intra-op threads as --threads set them."""
        out = Threads.for_cores().to_dict()
        options = getattr(service.executor, "engine_options", None)
        if options is not None and options.threads:
            out["intra_op"] = options.threads
        out["batch_workers"] = service.settings.batching.workers
        out["http_threadpool"] = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        out["blas_library"] = blas_library()
        return out

    def check_features(regions: Any) -> Any:
        # what a search would refuse is refused before the append, alike (422 naming the field)
        return service.require_ready().prepare("image_to_text", regions, field="features").regions

    k_doc = api.k_schema(limits)
    search_errors = (400, 408, 409, 413, 415, 422, 500, 503)
    write_errors = (400, 401, 408, 409, 413, 415, 422, 500, 503, 504, 507)

    @app.post(
        "/v1/search/text",
        summary="Text queries -> top-k images",
        openapi_extra=api.operation(
            limits, "queries", {"queries": api.captions_schema(limits.max_queries, limits), "k": k_doc}
        ),
        responses=api.responses(api.SearchResults, *search_errors),
    )
    async def search_text(request: Request) -> Response:
        async def run():
            t0 = time.perf_counter()
            queries, k = await parsed(request, rq.parse_search_text, limits)
            parse = time.perf_counter() - t0
            return _answer(service, "text", parse, await service.search_text(queries, k))

        return await _guard("/v1/search/text", run)

    @app.post(
        "/v1/search/images",
        summary="Image queries (region features) -> top-k captions",
        openapi_extra=api.operation(
            limits,
            "queries",
            {
                "queries": api.regions_schema(limits, "the query images"),
                "ids": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "instead of queries: images of the image gallery as the queries",
                },
                "k": k_doc,
            },
            npy=".npy float array (n, regions, img_dim); k in the query string",
            query=("k",),
        ),
        responses=api.responses(api.SearchResults, *search_errors),
    )
    async def search_images(request: Request) -> Response:
        async def run():
            query = dict(request.query_params)
            t0 = time.perf_counter()
            regions, k, ids = await parsed(request, rq.parse_search_images, query, limits, max_regions())
            parse = time.perf_counter() - t0
            return _answer(service, "images", parse, await service.search_images(regions, k, ids))

        return await _guard("/v1/search/images", run)

    @app.post(
        "/v1/gallery/images",
        summary="Append images to the gallery",
        openapi_extra=api.operation(
            limits,
            "features",
            {
                "features": api.regions_schema(limits, "the new images"),
                "names": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "one name per image: required when the gallery has names, refused when not",
                },
            },
            npy=".npy float array (n, regions, img_dim); names in the query string",
            query=("names",),
        ),
        responses=api.responses(api.AppendResult, *write_errors),
    )
    async def append_images(request: Request) -> Response:
        async def run():
            _authorize(request)
            service.require_ready()  # 503 before reading a large body
            query = dict(request.query_params)
            regions, names = await parsed(request, rq.parse_append_images, query, limits, max_regions())
            regions = await run_in_threadpool(check_features, regions)
            try:
                return await _write(service.append_images, regions, names, _key(request))
            except GalleryError as e:  # a conflict with the gallery: the names, or the regions per image
                if isinstance(e, StorageError):  # the server's disk, not the request
                    raise
                field = _field(str(e))
                raise ApiError(409, str(e) if field else f"features: {e}", field=field or "features") from e

        return await _guard("/v1/gallery/images", run)

    @app.post(
        "/v1/gallery/captions",
        summary="Append captions to the gallery",
        openapi_extra=api.operation(
            limits, "captions", {"captions": api.captions_schema(limits.max_append_items, limits)}
        ),
        responses=api.responses(api.AppendResult, *write_errors),
    )
    async def append_captions(request: Request) -> Response:
        async def run():
            _authorize(request)
            service.require_ready()
            captions = await parsed(request, rq.parse_append_captions, limits)
            return await _write(service.append_captions, captions, _key(request))

        return await _guard("/v1/gallery/captions", run)

    @app.get("/v1/info", summary="Model, galleries, backend, batching, limits, versions (paths: with the token)")
    async def info(request: Request) -> Response:
        async def run():
            out: dict[str, Any] = {
                "ready": service.ready,
                **service.settings.to_dict(),
                "auth": {"writes_need_token": service.token is not None},
                "versions": versions(),
            }
            out["limits"]["max_regions"] = max_regions()
            out["threads"] = threads_info()
            if service.ready:
                await run_in_threadpool(service.executor.refresh)  # sizes as committed, by any writer
                out.update(service.executor.describe())
            if service.token is not None and not _has_token(request):
                out = _without_paths(out)
            return out

        return await _guard("/v1/info", run)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once the engine and galleries are loaded, 503 before")
    async def readyz() -> Response:
        if service.ready:
            await run_in_threadpool(service.executor.refresh)  # sizes as committed, by any writer
            return JSONResponse({"status": "ready", **service.executor.sizes()})
        reason = f"loading failed: {service.load_error}" if service.load_error else "loading the engine and galleries"
        return _error(503, f"not ready: {reason}", headers=_retry_after(1))

    def body(required: str, properties: dict[str, Any], npy: str | None = None) -> dict[str, Any]:
        return api.operation(limits, required, properties, npy)

    page.add_routes(app, service, _guard, body, max_regions)  # the search page, its pictures and explanations

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.monitoring.exposition(), media_type=service.monitoring.CONTENT_TYPE)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(api.DOCS_HTML)

    return app


def _without_paths(obj: Any) -> Any:
    """``obj`` with the server's file paths (``PATH_KEYS``, at any depth) replaced by null."""
    if isinstance(obj, dict):
        return {k: None if k in PATH_KEYS else _without_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj
