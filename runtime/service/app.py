"""The FastAPI application of the search service: routes, status codes, error bodies, auth, body limits.

Every error is ``{"error": message}`` (plus ``field``/``limit``/``received`` when one input is at fault):
400 malformed body, 401 missing or wrong token, 404/405 unknown route, 409 no gallery for that direction
or a gallery conflict, 413 too large, 415 wrong Content-Type, 422 invalid value, 503 not ready or queue
full (with ``Retry-After``), 500 an internal failure of that one request (logged; the server keeps serving).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import platform
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import __version__
from runtime.features import FeatureError
from runtime.gallery import GalleryError
from runtime.gallery.store import StorageError
from runtime.searcher import OutcomeUnknown, SearchError, ShardUnavailableError
from runtime.service import page
from runtime.service import requests as rq
from runtime.service.batcher import BatcherClosed, QueueFull
from runtime.service.requests import ApiError
from runtime.service.service import NoGallery, NotReady, Service
from runtime.service.types import Appended, Hits
from runtime.tokenizer import TokenizerError

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


async def _guard(endpoint: str, fn: Callable[[], Awaitable[Any]]) -> Response:
    """Run a handler body: client mistakes -> 4xx, overload -> 503, anything else -> 500 for this request only."""
    try:
        out = await fn()
        return out if isinstance(out, Response) else JSONResponse(out)
    except ApiError as e:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    except (TokenizerError, FeatureError, SearchError) as e:
        return _error(422, str(e))
    except NoGallery as e:
        return _error(409, str(e))
    except StorageError as e:  # the server's disk refused the write (nothing of it remains)
        logger.error("%s: %s", endpoint, e)
        return _error(507 if e.full else 500, str(e))
    except OutcomeUnknown as e:  # no Retry-After: a blind retry could apply the write twice
        logger.error("%s: %s", endpoint, e)
        return _error(504, str(e), committed="unknown")
    except GalleryError as e:
        return _error(409, str(e))
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


def _body(required: str, properties: dict[str, Any], npy: str | None = None) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint: a JSON object with ``properties`` (``required`` among them) and,
    with ``npy`` (its description), a raw .npy body too."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"type": "object", "required": [required], "properties": properties}}
    }
    if npy is not None:
        content[rq.NPY] = {"schema": {"type": "string", "format": "binary", "description": npy}}
    return {"requestBody": {"required": True, "content": content}}


def _appended_json(out: Appended) -> dict[str, Any]:
    return {"added": out.added, "ids": list(range(out.first_id, out.first_id + out.added)), "count": out.count}


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


def _hits_json(hits: Hits) -> dict[str, Any]:
    return {"ids": hits.ids.tolist(), "scores": rq.json_scores(hits.scores), "names": hits.names}


class _Guard:
    """ASGI middleware: body size limits (Content-Length and while streaming), per-request metrics and log line."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        limits = self.service.settings.limits
        limit = limits.max_append_bytes if path.startswith(WRITE_PREFIX) else limits.max_body_bytes
        t0 = time.perf_counter()
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
            received = 0

            async def counted_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
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
            level = logging.WARNING if status >= 500 and path != "/readyz" else logging.DEBUG
            if logger.isEnabledFor(level):
                logger.log(level, "%s %s %d %.1f ms", scope["method"], path, status, seconds * 1000)


def create_app(service: Service) -> FastAPI:
    """The application for ``service``; its lifespan starts loading and, at shutdown, drains the batcher."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="SCAN search",
        version=__version__,
        lifespan=lifespan,
        description="Top-k image-text search with an exported SCAN model; queries of concurrent requests are batched.",
    )
    app.add_middleware(_Guard, service=service)
    limits = service.settings.limits

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", headers=exc.headers)

    def _authorize(request: Request) -> None:
        if service.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
            raise ApiError(
                401,
                "Authorization: gallery writes need 'Authorization: Bearer <token>' (missing or wrong token)",
                field="Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )

    k_schema = {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": rq.DEFAULT_K}
    search_body = _body(
        "queries",
        {"queries": {"type": "array", "items": {"type": "string"}, "maxItems": limits.max_queries}, "k": k_schema},
    )
    image_body = _body(
        "queries",
        {
            "queries": {"type": "array", "description": "region features (n, regions, img_dim)"},
            "ids": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "instead of queries: images of the image gallery as the queries",
            },
            "k": k_schema,
        },
        npy=".npy float array (n, regions, img_dim); k in the query string",
    )
    append_images_body = _body(
        "features",
        {
            "features": {"type": "array", "description": "region features (n, regions, img_dim)"},
            "names": {"type": "array", "items": {"type": "string"}},
        },
        npy=".npy features; names as a JSON array in the query string",
    )
    append_captions_body = _body("captions", {"captions": {"type": "array", "items": {"type": "string"}}})

    @app.post("/v1/search/text", openapi_extra=search_body, summary="Text queries -> top-k images")
    async def search_text(request: Request) -> Response:
        async def run():
            queries, k = rq.parse_search_text(await request.body(), request.headers.get("content-type"), limits)
            return _hits_json(await service.search_text(queries, k))

        return await _guard("/v1/search/text", run)

    @app.post(
        "/v1/search/images", openapi_extra=image_body, summary="Image queries (region features) -> top-k captions"
    )
    async def search_images(request: Request) -> Response:
        async def run():
            regions, k, ids = rq.parse_search_images(
                await request.body(), request.headers.get("content-type"), request.query_params, limits
            )
            return _hits_json(await service.search_images(regions, k, ids))

        return await _guard("/v1/search/images", run)

    @app.post("/v1/gallery/images", openapi_extra=append_images_body, summary="Append images to the gallery")
    async def append_images(request: Request) -> Response:
        async def run():
            _authorize(request)
            service.require_ready()  # 503 before reading a large body
            regions, names = rq.parse_append_images(
                await request.body(), request.headers.get("content-type"), request.query_params, limits
            )
            return await _write(service.append_images, regions, names, _key(request))

        return await _guard("/v1/gallery/images", run)

    @app.post("/v1/gallery/captions", openapi_extra=append_captions_body, summary="Append captions to the gallery")
    async def append_captions(request: Request) -> Response:
        async def run():
            _authorize(request)
            service.require_ready()
            captions = rq.parse_append_captions(await request.body(), request.headers.get("content-type"), limits)
            return await _write(service.append_captions, captions, _key(request))

        return await _guard("/v1/gallery/captions", run)

    @app.get("/v1/info", summary="Model, galleries, backend, batching, limits, versions")
    async def info() -> Response:
        async def run():
            out: dict[str, Any] = {
                "ready": service.ready,
                **service.settings.to_dict(),
                "auth": {"writes_need_token": service.token is not None},
                "versions": versions(),
            }
            if service.ready:
                out.update(service.executor.describe())
            return out

        return await _guard("/v1/info", run)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once the engine and galleries are loaded, 503 before")
    async def readyz() -> Response:
        if service.ready:
            return JSONResponse({"status": "ready", **service.executor.sizes()})
        reason = f"loading failed: {service.load_error}" if service.load_error else "loading the engine and galleries"
        return _error(503, f"not ready: {reason}", headers=_retry_after(1))

    page.add_routes(app, service, _guard, _body)  # the search page, its pictures and explanations

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.monitoring.exposition(), media_type=service.monitoring.CONTENT_TYPE)

    return app
