"""The search page and what it calls beyond search (runtime/service/static/API.md): ``GET /`` and
``/static/*`` from the package, the image gallery's listing and pictures (``GET /v1/images``,
``GET /v1/images/{id}``, with ``--image-dir``) and ``POST /v1/explain``, why a pair matched.

``add_routes`` adds them to the service's application; errors are the service's usual JSON bodies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from runtime.service import requests as rq
from runtime.service.requests import NPY, ApiError
from runtime.service.service import Service
from runtime.service.settings import Limits

STATIC = Path(__file__).resolve().parent / "static"
MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
PAGE_LIMIT, MAX_PAGE_LIMIT = 24, 100


def parse_explain(
    body: bytes, content_type: str | None, query: Mapping[str, str], limits: Limits, max_regions: int
) -> dict[str, Any]:
    """A pair to explain (API.md): ``{"query", "id"}``, ``{"image_id", "id"}``, ``{"queries", "id"}`` or an .npy
    body with ``?id=``. The keyword arguments of ``Service.explain``. ``max_regions``: as for image searches."""
    if rq.media_type(content_type) == NPY:
        regions = rq.regions_from_npy(body, "body")
        return {
            "item": rq.parse_id(query.get("id"), "id", from_query=True),
            "regions": _one_image(regions, "body", max_regions),
        }
    obj = rq.parse_json(body, content_type)
    rq._check_fields(obj, ("query", "image_id", "queries", "id"), ("id",))
    forms = [f for f in ("query", "image_id", "queries") if f in obj]
    if len(forms) != 1:
        raise ApiError(
            422, f"body: expected exactly one of query, image_id and queries, received {forms or 'none'}", field="body"
        )
    out: dict[str, Any] = {"item": rq.parse_id(obj["id"], "id")}
    if "query" in obj:
        caption = obj["query"]
        if not isinstance(caption, str):
            raise rq._wrong_type("query", "a string", caption)
        if len(caption) > limits.max_caption_chars:
            raise ApiError(
                413,
                f"query: at most {limits.max_caption_chars} characters, received {len(caption)}",
                field="query",
                limit=limits.max_caption_chars,
            )
        if not caption.strip():
            raise ApiError(422, "query: empty caption (expected at least one word)", field="query", received=caption)
        out["caption"] = caption
    elif "image_id" in obj:
        out["image_id"] = rq.parse_id(obj["image_id"], "image_id")
    else:
        out["regions"] = _one_image(
            rq._regions_from_lists(obj["queries"], "queries", max_regions), "queries", max_regions
        )
    return out


def _one_image(regions: np.ndarray, field: str, max_regions: int) -> np.ndarray:
    if regions.ndim == 3:
        rq._check_regions(int(regions.shape[1]), field, max_regions)
    if regions.ndim == 3 and regions.shape[0] != 1:
        raise ApiError(
            422,
            f"{field}: explain takes one image, received {regions.shape[0]}",
            field=field,
            received=regions.shape[0],
        )
    return regions


def _page_param(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(422, f"{name}: expected an integer {bound}, received {rq._short(raw)}", field=name)
    return value


def add_routes(
    app: FastAPI,
    service: Service,
    guard: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Response]],
    body: Callable[..., dict[str, Any]],
    max_regions: Callable[[], int],
) -> None:
    """The page's routes on ``app``; ``guard`` turns a handler's errors into the service's JSON errors, ``body``
    makes an OpenAPI request body, ``max_regions`` gives the regions per image query allowed (app.py's)."""
    limits = service.settings.limits

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type=MEDIA[".html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC / name
        if path.suffix not in MEDIA or not path.is_file() or path.parent != STATIC:
            return await guard("/static", _not_found(f"GET /static/{name}: no such file"))
        return FileResponse(path, media_type=MEDIA[path.suffix])

    @app.get("/v1/images", summary="The image gallery, a page at a time: ids, names, whether pictures are served")
    async def images(request: Request) -> Response:
        async def run():
            offset = _page_param(request.query_params, "offset", 0, 0, None)
            limit = _page_param(request.query_params, "limit", PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
            count, ids, names = service.images(offset, limit)
            return {
                "count": count,
                "offset": offset,
                "ids": ids,
                "names": names,
                "pictures": service.pictures is not None,
            }

        return await guard("/v1/images", run)

    @app.get("/v1/images/{image_id}", summary="One gallery image's picture (from --image-dir)")
    async def picture(image_id: str) -> Response:
        async def run():
            item = rq.parse_id(image_id, "id", from_query=True)
            path = _picture(item)
            if path is None:
                raise ApiError(404, f"image {item}: no picture (the service has no --image-dir)", field="id")
            return FileResponse(path, media_type=service.pictures.media_type(path))

        def _picture(item: int) -> Path | None:
            if service.pictures is None:
                return None
            try:
                name = service.require_ready().image_name(item)
            except ValueError as e:  # an id outside the gallery
                raise ApiError(404, str(e), field="id") from e
            path = service.pictures.find(name)
            if path is None:
                raise ApiError(404, f"image {item}: no picture for {name!r} in the image folder", field="id")
            return path

        return await guard("/v1/images/{id}", run)

    explain_body = body(
        "id",
        {
            "id": {"type": "integer", "description": "the gallery id: an image (with query), a caption (otherwise)"},
            "query": {"type": "string", "description": "a caption (text -> image)"},
            "image_id": {"type": "integer", "description": "an image of the gallery (image -> text)"},
            "queries": {"type": "array", "description": "one image's region features (1, regions, img_dim)"},
        },
        npy=".npy float array (1, regions, img_dim) of one image; the caption id in the query string (?id=)",
    )

    @app.post(
        "/v1/explain",
        openapi_extra=explain_body,
        summary="Why a pair matched: the model's word-region attention and the pieces of the score",
    )
    async def explain(request: Request) -> Response:
        async def run():
            pair = parse_explain(
                await request.body(), request.headers.get("content-type"), request.query_params, limits, max_regions()
            )
            out = await run_in_threadpool(service.explain, **pair)
            if out["image_id"] is not None and service.pictures is not None:
                name = service.executor.image_name(out["image_id"])
                out["picture"] = f"/v1/images/{out['image_id']}" if service.pictures.find(name) else None
            return out

        return await guard("/v1/explain", run)


def _not_found(message: str) -> Callable[[], Awaitable[Any]]:
    async def run():
        raise ApiError(404, message)

    return run
