"""Which search a two-stage request runs: exact, dense candidates or the index's candidates, the cheapest.

Two-stage search pays only where finding and rescoring ``M`` candidates costs less than scoring every item.
At 5K images a flat index asked for 2000 neighbours per word costs 3x an exact search; at 20K images an
IVF index is 13x cheaper. The choice is made per search from a cost model measured on this machine
(``bench/cost_model.py`` writes ``search_costs.json`` beside this file; docs/two_stage.md, "Cost model"):

* exact:  ``exact * Qv * V * d + exact_pass * V * d * batches`` (the head scores every item);
* dense:  ``dense * Qv * V * d + dense_pass * V * d * batches`` (one GEMM of the query vectors with every
  gallery vector, ``runtime/gallery/index.py: DenseCandidates``) + rerank;
* index:  ``scan[kind] * Qv * visited * d + neighbour[kind] * Qv * k`` (``visited``: the vectors a query
  vector's search visits: all of them for a flat index, ``nlist + nprobe * V / nlist`` for IVF; ``k``
  neighbours, each selected by faiss and counted by the candidate score) + rerank;
* rerank: ``rerank * Qv * M' * (V / N) * d + rerank_query * Q`` (``M'``: the candidates scored),

with ``Qv`` query vectors (words or regions) over ``Q`` queries, a gallery of ``N`` items and ``V`` vectors
of dimension ``d``, read once per query batch (``batches``). An ensemble adds its members' costs. A candidate
plan is chosen only when estimated ``MARGIN`` times cheaper than exact; ties go to exact search, then dense
(exact candidates) before an index. Tests inject their own ``Costs``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COSTS_FILE = Path(__file__).with_name("search_costs.json")
COSTS_FORMAT = "scan-search-costs/1"
PLANS = ("exact", "dense", "index")
MARGIN = 1.5  # how much cheaper than exact a candidate plan must be estimated (bench/two_stage_cost.py)


class CostModelError(ValueError):
    """The cost model file is missing a constant or holds one that is not a non-negative number."""


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work on one machine (``bench/cost_model.py`` measures and fits them)."""

    exact: float  # exact head, per (query vector x gallery vector x dim)
    exact_pass: float  # exact head, per (gallery vector x dim) read, once per query batch
    dense: float  # dense candidate score, per (query vector x gallery vector x dim)
    dense_pass: float  # dense candidate score, per (gallery vector x dim) read, converted, normalised
    scan: dict[str, float] = field(default_factory=dict)  # per index kind: per (query vector x visited vector x dim)
    neighbour: dict[str, float] = field(default_factory=dict)  # per index kind: per (query vector x neighbour)
    rerank: float = 0.0  # exact rerank, per (query vector x candidate vector x dim)
    rerank_query: float = 0.0  # exact rerank, per query (its head calls)
    source: str = ""  # where the figures come from (machine, load, date)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "costs") -> Costs:
        names = ("exact", "exact_pass", "dense", "dense_pass", "rerank", "rerank_query")
        values: dict[str, Any] = {}
        try:
            for name in names:
                values[name] = _non_negative(data[name], f"{where}: {name}")
            for name in ("scan", "neighbour"):
                values[name] = {str(k): _non_negative(v, f"{where}: {name}.{k}") for k, v in data[name].items()}
        except (KeyError, TypeError, AttributeError) as e:
            expected = (*names, "scan", "neighbour")
            raise CostModelError(f"{where}: expected the constants {expected}, received {data!r:.200}") from e
        return cls(**values, source=str(data.get("source", "")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _non_negative(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise CostModelError(f"{what}: expected a non-negative number of seconds, received {v!r}")
    return float(v)


def load_costs(path: Path | str = COSTS_FILE) -> Costs:
    """The constants measured on this machine (``bench/cost_model.py --write``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CostModelError(f"{path}: unreadable cost model ({e}); rerun python -m bench.cost_model --write") from e
    if not isinstance(data, dict) or data.get("format") != COSTS_FORMAT:
        raise CostModelError(f"{path}: expected a {COSTS_FORMAT} file, received {str(data)[:120]}")
    return Costs.from_dict(data.get("costs"), str(path))


@dataclass(frozen=True)
class Work:
    """The size of one search: what the cost model needs to know."""

    queries: int  # Q
    query_vectors: int  # Qv: the queries' words (text queries) or regions (image queries), all together
    items: int  # N, the gallery's items
    vectors: int  # V, the gallery's vectors (regions or words)
    dim: int  # d
    batches: int  # query batches (each reads the whole gallery once in exact or dense scoring)
    members: int = 1  # an ensemble's members (each scores exactly)
    proposing: int = 1  # the members whose candidates are united


@dataclass(frozen=True)
class Plan:
    """The chosen search (``PLANS``) and every estimate in seconds (None: not available)."""

    kind: str
    estimates: dict[str, float | None]
    candidates: int
    items: int

    def describe(self) -> str:
        est = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.estimates.items() if v is not None)
        return f"M={self.candidates} at N={self.items}: {self.kind} ({est})"


def index_visits(index: dict[str, Any] | None, vectors: int, k: int, nprobe: int) -> tuple[str, float] | None:
    """(kind, gallery vectors one query vector's search visits) for an index described by ``index`` (the
    ``"index"`` entry of ``candidates.json``: ``kind``, ``nlist``), or None where there is no index."""
    if not index:
        return None
    kind = str(index.get("kind"))
    if kind == "flat":
        return kind, float(vectors)
    if kind == "hnsw":  # efSearch candidates, each with its links' distances (32 links)
        return kind, float(max(k, 64) * 32)
    nlist = max(1, int(index.get("nlist") or 1))
    return kind, nlist + min(nprobe, nlist) * vectors / nlist


def choose(costs: Costs, work: Work, m: int, index: dict[str, Any] | None, neighbors: int, nprobe: int) -> Plan:
    """The cheapest of exact search, dense candidates and (where there is one) the index's candidates.

    ``index``: the index's description (``candidates.json``'s ``"index"``: kind, nlist), None without one;
    ``neighbors``: per query vector; ``nprobe``: IVF lists probed."""
    w, c = work, costs
    vdp = w.query_vectors * w.vectors * w.dim  # query vector x gallery vector x dim products
    passes = w.vectors * w.dim * max(1, w.batches)
    exact = w.members * (c.exact * vdp + c.exact_pass * passes)
    scored = min(w.items, w.proposing * m)
    per_item = w.vectors / max(1, w.items)
    rerank = w.members * (c.rerank * w.query_vectors * scored * per_item * w.dim + c.rerank_query * w.queries)
    dense = w.proposing * (c.dense * vdp + c.dense_pass * passes) + rerank
    estimates: dict[str, float | None] = {"exact": exact, "dense": dense, "index": None}
    visits = index_visits(index, w.vectors, min(neighbors, w.vectors), nprobe)
    if visits is not None:
        kind, visited = visits
        scan = c.scan.get(kind, max(c.scan.values(), default=c.dense))  # an unmeasured kind: the dearest
        neighbour = c.neighbour.get(kind, max(c.neighbour.values(), default=0.0))
        k = min(neighbors, w.vectors)
        estimates["index"] = w.proposing * w.query_vectors * (scan * visited * w.dim + neighbour * k) + rerank
    # A candidate plan must beat exact by MARGIN: the model leaves out each search's own overheads (Python,
    # faiss calls) and its constants were measured under some load; exact search is never the risk.
    weighed = {p: v * (1.0 if p == "exact" else MARGIN) for p, v in estimates.items() if v is not None}
    best = min((v, PLANS.index(p), p) for p, v in weighed.items())[2]
    return Plan(best, estimates, m, w.items)
