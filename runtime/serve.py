"""Serve top-k search over HTTP, batching the queries of concurrent requests (FastAPI + uvicorn).

    python runtime/serve.py --engine engines/scan.json --gallery gal [--host 127.0.0.1] [--port 8080]
                            [--max-batch 32] [--max-delay-ms 5] [--workers 1] [--token-file F]

Endpoints: POST /v1/search/text, POST /v1/search/images, POST /v1/gallery/images, POST /v1/gallery/captions,
GET /v1/info, /healthz, /readyz, /metrics, /docs (docs/serving.md); the search page at GET / with
GET /v1/images, GET /v1/images/{id} (pictures from --image-dir) and POST /v1/explain (docs/explain.md).
The engine and galleries load in the background: /readyz answers 503 until they are loaded. SIGTERM or SIGINT
stops accepting connections, finishes the requests in flight and exits 0. Binds to loopback unless --host says
otherwise.

Several --engine serve an ensemble (runtime/searcher.py; --weights 0.7,0.3, equal by default): each batch is
scored by every member and the similarities averaged; the gallery folder holds one cache per member
(runtime/gallery/members.py), and appends extend every member's together.

--shards S serves the gallery in S shards of contiguous id ranges, each resident in a Ray actor
(runtime/cluster.py; --ray-address joins a cluster, else a local Ray instance starts): every batch goes to all
shards and their top-k are merged, the same answers as one process. A dead or restarting shard answers 503
with Retry-After, never a partial top-k; appends go to the last shard; /v1/info lists the shards.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from runtime.cli import USER_ERRORS, add_engine_arguments, add_engines_arguments, engine_options, search_options
from runtime.install import install_command
from runtime.logs import command_parser, setup_logging
from runtime.options import CANDIDATE_SOURCES
from runtime.pictures import ImageFolder
from runtime.searcher import check_weights
from runtime.service.settings import Batching, Limits, MiB, Settings
from runtime.threads import Threads, limit_blas

logger = logging.getLogger("runtime.serve")

B, L = Batching(), Limits()
MIN_TOKEN_CHARS = 16


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("HTTP search service for an exported SCAN model.")
    add_engines_arguments(p, "to serve an ensemble")
    p.add_argument("--gallery", required=True, help="gallery folder (images/ and captions/; created by appends)")
    p.add_argument(
        "--image-dir", help="folder of the gallery images' pictures (<name>, <name>.png or .jpg) for the search page"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=B.max_batch, help="queries merged into one search call")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=B.max_delay_ms,
        help="how long a batch may wait for as many batch-mates as the last batch had (0: never)",
    )
    p.add_argument("--workers", type=int, default=B.workers, help="threads executing batches (one process)")
    p.add_argument("--max-queue", type=int, default=B.max_queue, help="queued queries before 503 + Retry-After")
    p.add_argument("--max-queries", type=int, default=L.max_queries, help="queries per search request")
    p.add_argument("--max-k", type=int, default=L.max_k, help="largest k a search request may ask for")
    p.add_argument(
        "--max-caption-chars",
        type=int,
        default=L.max_caption_chars,
        help="characters per caption, in queries and appends (the model's max_words applies too)",
    )
    p.add_argument("--max-body-mb", type=float, default=L.max_body_bytes / MiB, help="search request bodies")
    p.add_argument("--max-append-mb", type=float, default=L.max_append_bytes / MiB, help="gallery append bodies")
    p.add_argument(
        "--max-append-items", type=int, default=L.max_append_items, help="images or captions per gallery append"
    )
    p.add_argument(
        "--max-regions",
        type=int,
        default=None,
        help="regions per image in queries and appends (default: the model's, when its engine fixes them, else 100)",
    )
    p.add_argument(
        "--header-timeout-s", type=float, default=L.header_timeout_s, help="a request's headers must arrive within it"
    )
    p.add_argument(
        "--body-timeout-s", type=float, default=L.body_timeout_s, help="a request's body must arrive within it (408)"
    )
    p.add_argument("--token-file", help="file holding the bearer token that gallery writes require")
    p.add_argument(
        "--candidates",
        type=int,
        default=0,
        metavar="M",
        help="two-stage search: score only the M candidates of the galleries' index (0: exact search)",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="S",
        help="serve the gallery in S shards, one Ray actor each (a folder made by runtime/shards.py split, "
        "or an unsharded gallery, split once into GALLERY.shards-S beside it)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --shards: join this Ray cluster (ray start --head ...); default: a local Ray instance",
    )
    p.add_argument(
        "--shard-timeout-s",
        type=float,
        default=30.0,
        help="with --shards: how long a batch waits for every shard before it fails with 503",
    )
    p.add_argument(
        "--candidate-source",
        choices=CANDIDATE_SOURCES,
        default="union",
        help="an ensemble's two-stage candidates: the union of every member's M or the first member's M",
    )
    p.add_argument("--grace-s", type=float, default=10.0, help="at shutdown, how long in-flight requests may take")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the least severe log lines written (the service's and uvicorn's)",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log each request (logged at info level)")
    add_engine_arguments(p)
    return p


def read_token(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--token-file {p}: no such file")
    token = p.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"--token-file {p}: empty (expected the token on one line)")
    if p.stat().st_mode & 0o077:
        logger.warning("--token-file %s is readable by other users (chmod 600 it)", p)
    if len(token) < MIN_TOKEN_CHARS:
        logger.warning(
            "--token-file %s: the token has %d characters; use at least %d random ones "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            p,
            len(token),
            MIN_TOKEN_CHARS,
        )
    return token


def main(argv: list[str] | None = None) -> int:
    return run(argv)


def run(argv: list[str] | None = None, service_type: type | None = None) -> int:
    """``main`` with ``service_type``: a ``runtime.service.service.Service`` subclass to serve with
    (bench/plain_server.py's baseline)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401  (the optional extra: a clear message when it is missing)
    except ImportError as e:
        print(f"error: the service needs the 'serve' extra ({install_command('serve')}): {e}", file=sys.stderr)
        return 2
    try:
        settings = Settings(
            Batching(args.max_batch, args.max_delay_ms, args.workers, args.max_queue),
            Limits(
                args.max_queries,
                args.max_k,
                args.max_caption_chars,
                int(args.max_body_mb * MiB),
                int(args.max_append_mb * MiB),
                args.max_append_items,
                args.max_regions,
                args.header_timeout_s,
                args.body_timeout_s,
            ),
        )
        token = read_token(args.token_file) if args.token_file else None
        pictures = ImageFolder(args.image_dir) if args.image_dir else None
        if Path(args.gallery).exists() and not Path(args.gallery).is_dir():
            raise ValueError(f"--gallery {args.gallery}: expected a folder, received a file")
        for engine in args.engine:
            if not Path(engine).exists():
                raise ValueError(f"--engine {engine}: no such file")
        check_weights(args.weights, len(args.engine))
        if args.candidates < 0:
            raise ValueError(f"--candidates must be >= 0 (0: exact search), received {args.candidates}")
        if args.shards is not None and args.shards < 1:
            raise ValueError(f"--shards must be a positive integer, received {args.shards}")
        if args.ray_address and args.shards is None:
            raise ValueError("--ray-address needs --shards S (the shards are the Ray actors)")
        if args.shards is not None and (len(args.engine) > 1 or args.candidates):
            raise ValueError("--shards serves one --engine with exact search (no ensemble, no --candidates)")
        if args.shards is not None:
            import ray  # noqa: F401  (the optional extra: a clear message when it is missing)
    except ImportError as e:
        print(f"error: --shards needs the 'cluster' extra ({install_command('cluster')}): {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(args, settings, token, pictures, service_type)


def serve(
    args: argparse.Namespace,
    settings: Settings,
    token: str | None,
    pictures: ImageFolder | None = None,
    service_type: type | None = None,
) -> int:
    import uvicorn

    from runtime.service.app import create_app
    from runtime.service.executor import Executor
    from runtime.service.server import Server, header_deadline
    from runtime.service.service import Service

    def open_executor():
        gallery, shards = args.gallery, None
        if args.shards is not None:
            from runtime.gallery.shards import ensure_split

            gallery = ensure_split(args.gallery, args.shards)
            shards = {"address": args.ray_address, "timeout_s": args.shard_timeout_s}
        options = search_options(args)
        return Executor.open(args.engine, gallery, engine_options(args), options, args.weights, shards)

    blas = limit_blas(Threads.for_cores().blas)  # before the engines start: numpy's BLAS shares their cores
    logger.debug("BLAS: %s", blas)
    started_ray = False
    if args.shards is not None:  # in the main thread: Ray's local processes die with the thread that starts them
        from runtime.cluster import connect

        started_ray = connect(args.ray_address)
    service = (service_type or Service)(open_executor, settings, token=token, pictures=pictures)
    app = create_app(service, access_log=not args.no_access_log)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # the app logs each request, with its latency
        log_config=None,  # uvicorn's lines through the root handler of setup_logging (--log-format)
        timeout_graceful_shutdown=args.grace_s,
        lifespan="on",
        http=header_deadline(settings.limits.header_timeout_s),
    )
    server = Server(config, on_shutdown=app.state.reads.stop)

    def summary(svc: Service) -> None:
        d = svc.executor.describe()
        g = {k: (v["count"] if v else "none") for k, v in d["galleries"].items()}
        b = settings.batching
        logger.info(
            "ready on http://%s:%d: engine %s (%s, %s, %s), gallery %s (images %s, captions %s), "
            "max-batch %d, max-delay %g ms, workers %d, max-queue %d, writes %s",
            args.host,
            args.port,
            ", ".join(args.engine),
            d["backend"],
            d["precision"],
            d["device"],
            args.gallery,
            g["images"],
            g["captions"],
            b.max_batch,
            b.max_delay_ms,
            b.workers,
            b.max_queue,
            "need a token" if token else "open (no --token-file)",
        )

    service.on_loaded.append(summary)

    def stop_after_startup(error: BaseException) -> None:
        # uvicorn 0.29 (the lowest allowed) returns without the lifespan shutdown when told to exit before its
        # startup is over, as a load that fails at once would; the lifespan task is then cancelled and logged
        # as a traceback. So wait for the startup (or its failure, bounded) first.
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        server.should_exit = True

    service.on_load_failed.append(stop_after_startup)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "binding to %s: the service is reachable from other machines%s",
            args.host,
            "" if token else "; gallery writes are open to them (use --token-file)",
        )

    # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown) and re-raises the signal to the
    # previous handler when it is done; these handlers make that a clean exit 0, and a signal that arrives
    # before uvicorn installs its own still stops the server.
    def stop(signum, frame) -> None:
        server.should_exit = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        print(f"error: could not serve on {args.host}:{args.port} (see the log above)", file=sys.stderr)
        return int(e.code) if isinstance(e.code, int) and e.code else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        service.close()
        if started_ray:
            import ray

            ray.shutdown()
    if service.load_error is not None:
        e = service.load_error
        print(
            f"error: {e}" if isinstance(e, USER_ERRORS) else f"error: loading failed: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 2
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
