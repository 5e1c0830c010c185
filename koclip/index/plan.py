"""Which FAISS indexes fit N vectors of dimension D in a memory budget (candidates, choose_index),
and what an existing index is (plan_of).

Every embedding is L2-normalised, so every index ranks by inner product.
  flat   exact IndexFlatIP, when N <= FLAT_MAX_ROWS (50k; a query scans all N x D floats, see
         bench/index.py for what that costs) and N*D*4 bytes fit the budget;
  hnsw   IndexHNSWFlat (M=32, efConstruction=64) when its estimated memory N*(4D + 8M + 16)
         (the vectors, 2M int32 links on level 0, ~1 link above, offsets) fits the budget;
  ivfflat "IVF{nlist},Flat": the vectors in inverted lists, N*(4D + 8) bytes plus the centroids;
  ivfsq8  "IVF{nlist},SQ8": 8-bit scalar-quantised vectors in inverted lists, N*(D + 8) bytes;
  ivfpq  "OPQ{m},IVF{nlist},PQ{m}" through index_factory, nlist = 4*sqrt(N) (at most N/39, so
         k-means has 39 points per list), m = D/8 bytes of PQ code per vector; re-ranked with
         8-bit scalar-quantised copies ("Refine(SQ8)", D bytes more per vector) when those fit
         the budget, else m grows to the largest divisor of D (<= D/2) that fits, no re-ranking.
         Trained on a seeded sample of max(39*nlist, min(256*nlist, 100k)) rows; OPQ with 25
         iterations on at most 32768 rows (faiss's defaults: 50 on 65536, twice the time).
The budget is the index's memory when served, not the build's.

A build does not trust one guess (bench/index.py --data hard: on nearly isotropic clusters HNSW
and IVF-PQ stop short of the target at any setting, IVF-Flat reaches it). `candidates` lists every
kind that fits the budget in order of expected search speed at a given recall,
    hnsw, ivfpq (with re-ranking), ivfsq8, ivfflat, flat (exact: always reaches the target),
and koclip.index.build tries them all (exact search only when no other reaches the target),
publishing the fastest that reaches it: the order is a guess, its measured speed decides.
Up to FLAT_MAX_ROWS rows, auto is exact search alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

from koclip.errors import IndexBuildError


KINDS = ("flat", "hnsw", "ivfflat", "ivfsq8", "ivfpq")
IVF_KINDS = ("ivfflat", "ivfsq8", "ivfpq")  # trained (k-means) and streamed by the build
SPEED_ORDER = ("hnsw", "ivfpq", "ivfsq8", "ivfflat", "flat")  # expected fastest first
FLAT_MAX_ROWS = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
IVFPQ_MIN_ROWS = 2048  # PQ trains 256 centroids per sub-quantizer
TRAIN_MAX_ROWS = 100_000
KF_MAX = 32
RECALL_K = 10
DEFAULT_MAX_MEMORY = 4 * 1024**3
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_QUERIES = 1000


def parse_memory(value: str | int | float) -> int:
    """Bytes from 4294967296, "4GB", "512 MiB", "1.5g" (K/M/G/T are powers of 1024)."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not match:
        raise IndexBuildError(f"cannot read memory size {value!r}; write e.g. 4GB, 512MB or a number of bytes")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}TB"


@dataclass(frozen=True)
class Plan:
    kind: str
    factory: str
    n: int
    dim: int
    estimated_bytes: int
    nlist: int = 0
    pq_m: int = 0
    refine: bool = False
    reason: str = ""

    @property
    def train_rows(self) -> int:
        return min(self.n, max(39 * self.nlist, min(256 * self.nlist, TRAIN_MAX_ROWS))) if self.nlist else 0


def estimate_memory(kind: str, n: int, dim: int, *, nlist: int = 0, pq_m: int = 0, refine: bool = False) -> int:
    """Bytes the index takes when loaded (the formulas of the module docstring)."""
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (4 * dim + 8 * HNSW_M + 16)
    if kind in ("ivfflat", "ivfsq8"):
        return n * ((4 * dim if kind == "ivfflat" else dim) + 8) + nlist * dim * 4 + 2 * dim * 4
    codebooks = nlist * dim * 4 + dim * dim * 4 + 256 * dim * 4  # IVF centroids, OPQ matrix, PQ centroids
    return n * (pq_m + 8 + (dim if refine else 0)) + codebooks


def _divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def ivf_nlist(n: int) -> int:
    """4*sqrt(N) inverted lists, at most N/39 (k-means wants 39 points per centroid)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39, 65536)))


def _check(n: int, kind: str) -> None:
    if kind not in ("auto", *KINDS):
        raise IndexBuildError(f"index kind must be one of auto, {', '.join(KINDS)}; got {kind!r}")
    if n <= 0:
        raise IndexBuildError("there are no vectors to index")


def plan_for(kind: str, n: int, dim: int, budget: int, why: str = "forced") -> Plan:
    """The Plan of one kind for N x D within `budget` (ivfpq shrinks its codes to fit; the other
    kinds are what they are: the caller checks estimated_bytes against the budget)."""
    if kind == "flat":
        return Plan("flat", "Flat", n, dim, estimate_memory("flat", n, dim), reason=why)
    if kind == "hnsw":
        return Plan("hnsw", f"HNSW{HNSW_M}", n, dim, estimate_memory("hnsw", n, dim), reason=why)
    if n < IVFPQ_MIN_ROWS:
        raise IndexBuildError(f"{kind} needs at least {IVFPQ_MIN_ROWS} vectors to train on, there are {n}")
    nlist = ivf_nlist(n)
    if kind in ("ivfflat", "ivfsq8"):
        factory = f"IVF{nlist}," + ("Flat" if kind == "ivfflat" else "SQ8")
        return Plan(kind, factory, n, dim, estimate_memory(kind, n, dim, nlist=nlist), nlist=nlist, reason=why)
    m = max(d for d in _divisors(dim) if d <= max(1, dim // 8))
    refine = estimate_memory("ivfpq", n, dim, nlist=nlist, pq_m=m, refine=True) <= budget
    if not refine:
        fitting = [d for d in _divisors(dim) if d <= max(1, dim // 2)
                   and estimate_memory("ivfpq", n, dim, nlist=nlist, pq_m=d) <= budget]
        if not fitting:
            need = estimate_memory("ivfpq", n, dim, nlist=nlist, pq_m=1)
            raise IndexBuildError(f"a budget of {format_bytes(budget)} cannot hold {n} vectors even as 1-byte "
                                  f"PQ codes (~{format_bytes(need)}); raise max_memory")
        m = max(fitting)  # no re-ranking: the biggest codes that fit
    factory = f"OPQ{m},IVF{nlist},PQ{m}" + (",Refine(SQ8)" if refine else "")
    size = estimate_memory("ivfpq", n, dim, nlist=nlist, pq_m=m, refine=refine)
    return Plan("ivfpq", factory, n, dim, size, nlist=nlist, pq_m=m, refine=refine, reason=why)


def candidates(n: int, dim: int, max_memory: str | int = DEFAULT_MAX_MEMORY, kind: str = "auto") -> list[Plan]:
    """The plans a build tries, in order (module docstring); a forced `kind` is the only one.

    auto: exact search alone up to FLAT_MAX_ROWS rows (when it fits), else every kind of
    SPEED_ORDER whose estimated memory fits the budget (ivfpq: when some code size fits)."""
    budget = parse_memory(max_memory)
    _check(n, kind)
    if kind != "auto":
        return [plan_for(kind, n, dim, budget)]
    flat = estimate_memory("flat", n, dim)
    if n <= FLAT_MAX_ROWS and flat <= budget:
        return [plan_for("flat", n, dim, budget, f"{n} rows <= {FLAT_MAX_ROWS}: exact search")]
    plans = []
    for name in SPEED_ORDER:
        if name in IVF_KINDS and n < IVFPQ_MIN_ROWS:
            continue
        try:
            plan = plan_for(name, n, dim, budget, f"fits the budget {format_bytes(budget)}")
        except IndexBuildError:  # ivfpq: not even 1-byte codes fit
            continue
        if plan.estimated_bytes <= budget:
            plans.append(plan)
    if not plans:
        smallest = plan_for("ivfpq", n, dim, budget) if n >= IVFPQ_MIN_ROWS else plan_for("flat", n, dim, budget)
        raise IndexBuildError(f"no index of {n} x {dim} vectors fits a budget of {format_bytes(budget)} "
                              f"(the smallest needs ~{format_bytes(smallest.estimated_bytes)}); raise max_memory")
    return plans


def choose_index(n: int, dim: int, max_memory: str | int = DEFAULT_MAX_MEMORY, kind: str = "auto") -> Plan:
    """The first index a build of N vectors of dimension D within max_memory bytes tries."""
    return candidates(n, dim, max_memory, kind)[0]


def kept_plan(old: Plan, plans: list[Plan], meta: dict) -> Plan | None:
    """The candidate of the old index's kind, when an extension may keep that kind (koclip.index.build's
    docstring: still a candidate, every other candidate but exact search tried by the build that
    published it, an IVF nlist within 2x), else None: rebuild through the candidates."""
    kinds = [p.kind for p in plans]
    if old.kind not in kinds:
        return None
    tried = {c["kind"] for c in meta.get("candidates", [])}
    if any(k not in tried for k in kinds if k not in (old.kind, "flat")):
        return None
    new = plans[kinds.index(old.kind)]
    if old.kind in IVF_KINDS and not new.nlist / 2 < old.nlist < new.nlist * 2:
        return None
    return new


def kind_of(index: faiss.Index) -> str:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivfflat"
    return "ivfsq8" if isinstance(index, faiss.IndexIVFScalarQuantizer) else "ivfpq"


def plan_of(index: faiss.Index, n: int, max_memory: int = DEFAULT_MAX_MEMORY) -> Plan:
    """The Plan an existing (or trained) index follows, for N rows."""
    kind, dim = kind_of(index), index.d
    if kind in ("flat", "hnsw"):
        return plan_for(kind, n, dim, max_memory, "given")
    ivf = faiss.extract_index_ivf(index)
    if kind != "ivfpq":
        factory = f"IVF{ivf.nlist}," + ("Flat" if kind == "ivfflat" else "SQ8")
        return Plan(kind, factory, n, dim, estimate_memory(kind, n, dim, nlist=ivf.nlist), nlist=ivf.nlist,
                    reason="given")
    m, refine = faiss.downcast_index(ivf).pq.M, isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    factory = f"OPQ{m},IVF{ivf.nlist},PQ{m}" + (",Refine(SQ8)" if refine else "")
    size = estimate_memory("ivfpq", n, dim, nlist=ivf.nlist, pq_m=m, refine=refine)
    return Plan("ivfpq", factory, n, dim, size, nlist=ivf.nlist, pq_m=m, refine=refine, reason="given")
