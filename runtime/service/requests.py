"""Request bodies -> validated queries. Every rejection is an ``ApiError`` naming the field, what was
expected (or the limit) and what was received; nothing here lets a client's mistake become a 500.

Search bodies: ``{"queries": [...], "k": int}`` as JSON; image queries may instead be an ``.npy`` body
(``application/octet-stream``) with ``k`` in the query string. An ``.npy`` header is checked against the
body's length before anything is allocated, and the array is a view of the body. Large JSON bodies are
parsed in worker processes (runtime/service/app.py): these functions and their errors are picklable.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.service.settings import DEFAULT_MAX_REGIONS, Limits

DEFAULT_K = 10
NPY = "application/octet-stream"
NPY_MAGIC = b"\x93NUMPY"
MAX_INT_DIGITS = 4300  # CPython's limit for int(str) (sys.get_int_max_str_digits): past it int() raises


class ApiError(Exception):
    """A client mistake: answered with ``status`` and ``{"error": message, ...}``."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        limit: Any = None,
        received: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.limit = limit
        self.received = received
        self.headers = headers or {}

    def __reduce__(self):  # raised in a parser process (runtime/service/app.py), answered by the server
        return ApiError, (self.status, self.message, self.field, self.limit, self.received, self.headers)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        for key in ("field", "limit", "received"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _received(value: Any) -> Any:
    """What an error body echoes of a bad JSON value: a finite number itself, anything else its JSON type
    (NaN and infinities are not JSON; strings are named, not quoted back)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _type_name(value)
    return value if math.isfinite(value) else _short(value)


def _integer(text: str) -> int | float:
    # An integer past the digit limit is out of every range here: +-inf, refused where it is checked.
    return int(text) if len(text) <= MAX_INT_DIGITS else float(text)


def _check_text(value: str, field: str) -> None:
    """Text must encode as UTF-8: a lone surrogate (JSON "\\ud800") would be stored and break every answer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            422,
            f"{field}: character {e.start} is a lone surrogate ({value[e.start]!a}); expected text that encodes "
            f"as UTF-8",
            field=field,
        ) from None


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_json(body: bytes, content_type: str | None) -> dict[str, Any]:
    mt = media_type(content_type)
    if mt not in ("application/json", ""):
        raise ApiError(
            415, f"Content-Type: expected application/json, received {mt!r}", field="Content-Type", received=mt
        )
    if not body:
        raise ApiError(400, "body: expected a JSON object, received an empty body", field="body")
    try:
        obj = json.loads(body, parse_int=_integer)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body: expected UTF-8 JSON, received an invalid byte at {e.start}", field="body") from e
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})", field="body") from e
    except RecursionError as e:
        raise ApiError(400, "body: JSON nested too deeply", field="body") from e
    if not isinstance(obj, dict):
        raise ApiError(
            422, f"body: expected a JSON object, received {_type_name(obj)}", field="body", received=_type_name(obj)
        )
    return obj


def _check_fields(obj: Mapping[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field (expected {', '.join(allowed)})", field=unknown[0])
    for name in required:
        if name not in obj:
            raise ApiError(422, f"{name}: required field missing", field=name)


def parse_k(value: Any, limits: Limits, from_query: bool = False) -> int:
    if value is None:
        return DEFAULT_K
    if from_query and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(
                422, f"k: expected a positive integer, received {value[:60]!r}", field="k", received=value[:60]
            ) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "" if isinstance(value, str) else f" {_short(value)}"
        raise ApiError(
            422,
            f"k: expected a positive integer, received {_type_name(value)}{shown}",
            field="k",
            received=_received(value),
        )
    if value <= 0:
        raise ApiError(422, f"k: expected a positive integer, received {value}", field="k", received=value)
    if value > limits.max_k:
        raise ApiError(
            422,
            f"k: at most {limits.max_k}, received {_short(value)}",
            field="k",
            limit=limits.max_k,
            received=value,
        )
    return value


def _wrong_type(field: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        422, f"{field}: expected {expected}, received {_type_name(value)}", field=field, received=_type_name(value)
    )


def _captions(value: Any, field: str, limit: int, limits: Limits) -> list[str]:
    if not isinstance(value, list):
        raise _wrong_type(field, "an array of strings", value)
    if not value:
        raise ApiError(422, f"{field}: expected at least one caption, received none", field=field, received=0)
    if len(value) > limit:
        raise ApiError(
            413,
            f"{field}: at most {limit} per request, received {len(value)}",
            field=field,
            limit=limit,
            received=len(value),
        )
    for i, c in enumerate(value):
        if not isinstance(c, str):
            raise ApiError(
                422,
                f"{field}[{i}]: expected a string, received {_type_name(c)} {_short(c)}",
                field=f"{field}[{i}]",
                received=_type_name(c),
            )
        if len(c) > limits.max_caption_chars:
            raise ApiError(
                413,
                f"{field}[{i}]: at most {limits.max_caption_chars} characters, received {len(c)}",
                field=f"{field}[{i}]",
                limit=limits.max_caption_chars,
                received=len(c),
            )
        if not c.strip():
            raise ApiError(
                422, f"{field}[{i}]: empty caption (expected at least one word)", field=f"{field}[{i}]", received=c
            )
        _check_text(c, f"{field}[{i}]")
    return value


def parse_search_text(body: bytes, content_type: str | None, limits: Limits) -> tuple[list[str], int]:
    obj = parse_json(body, content_type)
    _check_fields(obj, ("queries", "k"), ("queries",))
    return _captions(obj["queries"], "queries", limits.max_queries, limits), parse_k(obj.get("k"), limits)


def _regions_from_lists(value: Any, field: str, max_regions: int = DEFAULT_MAX_REGIONS) -> np.ndarray:
    if not isinstance(value, list):
        raise _wrong_type(field, "nested arrays of numbers (n, regions, img_dim)", value)
    if not value:
        return np.zeros((0,), np.float32)  # refused by _check_count, naming the field
    for q in value:  # before converting anything
        if isinstance(q, list) and q and isinstance(q[0], list):
            _check_regions(len(q), field, max_regions)
    pieces = []
    for q in value:  # one image at a time: ragged input is named, and float32 pieces keep the peak low
        try:
            piece = np.array(q)
        except (ValueError, TypeError) as e:
            raise ApiError(
                422,
                f"{field}: expected nested arrays of numbers (n, regions, img_dim) of equal lengths ({e})",
                field=field,
            ) from e
        if piece.dtype.kind not in "iuf":  # strings, booleans, nulls (object) and mixtures
            raise ApiError(
                422,
                f"{field}: expected numbers, received elements of type {piece.dtype.kind!r} "
                f"({'strings' if piece.dtype.kind == 'U' else piece.dtype.name})",
                field=field,
            )
        pieces.append(piece.astype(np.float32))
    if len({p.shape for p in pieces}) > 1:
        raise ApiError(
            422,
            f"{field}: expected nested arrays of numbers (n, regions, img_dim) of equal lengths, received images "
            f"of shapes {pieces[0].shape} and {next(p.shape for p in pieces if p.shape != pieces[0].shape)}",
            field=field,
        )
    return np.stack(pieces)


def regions_from_npy(body: bytes, field: str) -> np.ndarray:
    """The float array of an ``.npy`` body, a read-only view of it: the header's shape and dtype must account
    for exactly the bytes after it, so a header declaring terabytes allocates nothing."""
    if not body:
        raise ApiError(400, f"{field}: expected an .npy body, received an empty body", field=field)
    if body.startswith(b"PK\x03\x04"):
        raise ApiError(400, f"{field}: expected one .npy array, received an .npz archive", field=field)
    if not body.startswith(NPY_MAGIC):
        raise ApiError(
            400,
            f"{field}: expected an .npy array (numpy.save), received {len(body)} bytes that do not start with "
            f"the .npy magic string \\x93NUMPY",
            field=field,
        )
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
    except (ValueError, OSError, EOFError) as e:
        raise ApiError(400, f"{field}: expected an .npy array, its header is unreadable ({e})", field=field) from e
    if dtype.hasobject:
        raise ApiError(
            400, f"{field}: expected an .npy array of numbers, received pickled objects (dtype {dtype})", field=field
        )
    if dtype.kind != "f":
        raise ApiError(
            422, f"{field}: expected floating-point features, received dtype {dtype}", field=field, received=str(dtype)
        )
    count = math.prod(shape)
    declared, held = count * dtype.itemsize, len(body) - f.tell()
    if declared != held:
        raise ApiError(
            400,
            f"{field}: the .npy header declares shape {shape} of {dtype} ({declared} bytes), the body holds "
            f"{held} bytes after the header",
            field=field,
            received=held,
        )
    return np.frombuffer(body, dtype, count, f.tell()).reshape(shape, order="F" if fortran_order else "C")


def _check_regions(regions: int, field: str, limit: int) -> None:
    if regions > limit:
        raise ApiError(
            413,
            f"{field}: at most {limit} regions per image, received {regions}",
            field=field,
            limit=limit,
            received=regions,
        )


def _check_count(arr: np.ndarray, field: str, limit: int, max_regions: int) -> None:
    if arr.ndim == 3:
        _check_regions(int(arr.shape[1]), field, max_regions)
    n = int(arr.shape[0]) if arr.ndim else 0
    if arr.ndim >= 1 and n == 0:
        raise ApiError(422, f"{field}: expected at least one image, received none", field=field, received=0)
    if n > limit:
        raise ApiError(
            413, f"{field}: at most {limit} images per request, received {n}", field=field, limit=limit, received=n
        )


def parse_search_images(
    body: bytes, content_type: str | None, query: Mapping[str, str], limits: Limits, max_regions: int
) -> tuple[np.ndarray | None, int, list[int] | None]:
    """``(regions, k, None)`` for region features (JSON ``queries`` or an .npy body), ``(None, k, ids)`` for
    ``{"ids": [...]}``: images of the gallery as the queries. ``max_regions``: regions per image
    (``limits.max_regions``, or the model's; see app.py)."""
    if media_type(content_type) == NPY:
        regions, k = regions_from_npy(body, "body"), parse_k(query.get("k"), limits, from_query=True)
    else:
        obj = parse_json(body, content_type)
        _check_fields(obj, ("queries", "ids", "k"), ())
        if ("queries" in obj) == ("ids" in obj):
            received = "both" if "ids" in obj else "neither"
            raise ApiError(
                422, f"queries: expected exactly one of queries and ids, received {received}", field="queries"
            )
        if "ids" in obj:
            return None, parse_k(obj.get("k"), limits), _ids(obj["ids"], limits.max_queries)
        regions, k = _regions_from_lists(obj["queries"], "queries", max_regions), parse_k(obj.get("k"), limits)
    _check_count(regions, "queries", limits.max_queries, max_regions)
    return regions, k, None


def parse_id(value: Any, field: str, from_query: bool = False) -> int:
    """A gallery id: an integer (in the query string, its digits); the searcher checks its range."""
    digits = value.strip().lstrip("-") if from_query and isinstance(value, str) else ""
    if digits.isdigit() and len(digits) <= MAX_INT_DIGITS:
        value = int(value.strip())
    if value is None:
        raise ApiError(422, f"{field}: required field missing", field=field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            422,
            f"{field}: expected an integer id, received {_type_name(value)} {_short(value)}",
            field=field,
            received=_received(value),
        )
    return value


def _ids(value: Any, limit: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ApiError(422, f"ids: expected a non-empty array of image ids, received {_short(value)}", field="ids")
    if len(value) > limit:
        raise ApiError(
            413,
            f"ids: at most {limit} per request, received {len(value)}",
            field="ids",
            limit=limit,
            received=len(value),
        )
    return [parse_id(v, f"ids[{i}]") for i, v in enumerate(value)]


def _names(value: Any, n: int) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ApiError(422, f"names: expected an array of strings, received {_short(value)}", field="names")
    if len(value) != n:
        raise ApiError(
            422, f"names: expected one name per image ({n}), received {len(value)}", field="names", received=len(value)
        )
    for i, name in enumerate(value):
        _check_text(name, f"names[{i}]")
    return value


def parse_append_images(
    body: bytes, content_type: str | None, query: Mapping[str, str], limits: Limits, max_regions: int
) -> tuple[np.ndarray, list[str] | None]:
    """JSON ``{"features": [...], "names": [...]}``, or an ``.npy`` body with ``names`` as a JSON array in the
    query string (``?names=["a.jpg","b.jpg"]``)."""
    if media_type(content_type) == NPY:
        regions = regions_from_npy(body, "body")
        names_raw = query.get("names")
        try:
            names_value = json.loads(names_raw, parse_int=_integer) if names_raw is not None else None
        except json.JSONDecodeError as e:
            raise ApiError(
                422, f"names: expected a JSON array of strings in the query string ({e.msg})", field="names"
            ) from e
    else:
        obj = parse_json(body, content_type)
        _check_fields(obj, ("features", "names"), ("features",))
        regions, names_value = _regions_from_lists(obj["features"], "features", max_regions), obj.get("names")
    _check_count(regions, "features", limits.max_append_items, max_regions)
    return regions, _names(names_value, int(regions.shape[0]) if regions.ndim else 0)


def parse_append_captions(body: bytes, content_type: str | None, limits: Limits) -> list[str]:
    obj = parse_json(body, content_type)
    _check_fields(obj, ("captions",), ("captions",))
    return _captions(obj["captions"], "captions", limits.max_append_items, limits)


def parser_process(parent: int) -> None:
    """A parser process's initializer. It yields the CPU to the server's event loop (parsing is background
    work, health checks are not), and exits once the server (``parent``) is gone, even killed, rather than
    parse the bodies still queued as an orphan."""
    os.nice(5)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def json_scores(scores: np.ndarray) -> list[list[float | None]]:
    """float32 scores as JSON numbers; -inf (past the gallery, id -1) as null (JSON has no infinities)."""
    return [[s if math.isfinite(s) else None for s in row] for row in scores.tolist()]
