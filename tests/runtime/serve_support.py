"""Helpers for the service tests: a small gallery on disk, a loaded service, an in-process HTTP client."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from runtime.engine import ScanEngine
from runtime.gallery import build_caption_gallery, build_image_gallery
from runtime.options import EngineOptions, WriteOptions
from runtime.service.app import create_app
from runtime.service.executor import Executor
from runtime.service.service import Service
from runtime.service.settings import Settings
from tests.runtime.conftest import random_captions, random_regions

N_IMAGES, N_CAPTIONS = 40, 60


def build_gallery(engine_path: Path, folder: Path, names: bool = True) -> Path:
    with ScanEngine.open(engine_path, EngineOptions(backend="onnxruntime", threads=1)) as engine:
        build_image_gallery(
            engine,
            random_regions(N_IMAGES, seed=1),
            folder / "images",
            names=[f"img{i}" for i in range(N_IMAGES)] if names else None,
            options=WriteOptions(progress=False),
        )
        build_caption_gallery(
            engine, random_captions(N_CAPTIONS, seed=2), folder / "captions", options=WriteOptions(progress=False)
        )
    return folder


def copy_gallery(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def local_service(
    engine_path: Path, gallery: Path, settings: Settings | None = None, token: str | None = None, start: bool = True
) -> Service:
    svc = Service(
        lambda: Executor.open([engine_path], gallery, EngineOptions(backend="onnxruntime", threads=1)),
        settings,
        token=token,
    )
    return started(svc) if start else svc


def started(svc: Service) -> Service:
    """``svc`` loaded (its loader thread joined); a load failure raises here."""
    svc.start().join()
    if svc.load_error is not None:
        raise svc.load_error
    return svc


def run_client(service: Service, body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``body(client)`` against the service's app in process (ASGI transport, no sockets)."""

    async def main():
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://scan.test", timeout=60) as client:
            return await body(client)

    return asyncio.run(main())


def request(service: Service, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def body(client):
        return await client.request(method, url, **kwargs)

    return run_client(service, body)
