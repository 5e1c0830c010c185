"""The FAISS side of koclip.index: choosing an index type, building, re-using, tuning.

Choice (choose_index): every embedding is L2-normalised, so every index ranks by inner product.
  flat   exact IndexFlatIP, when N <= FLAT_MAX_ROWS (50k; a query scans all N x D floats, see
         bench/index.py for what that costs) and N*D*4 bytes fit the budget;
  hnsw   IndexHNSWFlat (M=32, efConstruction=64) when its estimated memory N*(4D + 8M + 16)
         (the vectors, 2M int32 links on level 0, ~1 link above, offsets) fits the budget;
  ivfpq  "OPQ{m},IVF{nlist},PQ{m}" through index_factory, nlist = 4*sqrt(N) (at most N/39, so
         k-means has 39 points per list), m = D/8 bytes of PQ code per vector; re-ranked with
         8-bit scalar-quantised copies ("Refine(SQ8)", D bytes more per vector) when those fit
         the budget, else m grows to the largest divisor of D (<= D/2) that fits, no re-ranking.
         Trained on a seeded sample of max(39*nlist, min(256*nlist, 100k)) rows; OPQ with 25
         iterations on at most 32768 rows (faiss's defaults: 50 on 65536, twice the time).
The budget is the index's memory when served, not the build's.

Tuning (build_and_tune): the tuning queries are `queries` seeded-random corpus rows, held out:
the index is built from the other rows, tuned, and only then are the query rows added, as the
last rows. Their ground truth is exact inner-product search over the indexed rows; recall@10 is
the share of those 10 true neighbours the index returns among its 10. So the queries are vectors
the index does not hold, like new items (a query that is itself in an HNSW graph leads the search
straight to its neighbours, which overstates recall; bench/index.py measured both). The
smallest efSearch (hnsw) or nprobe (ivfpq; with re-ranking, then the smallest k_factor at that
nprobe, then nprobe again) reaching the target is kept, found by doubling then bisection (recall
is assumed to grow with the parameter). If the target is not reached, the largest setting tried
is kept, Tuning.reached is False and a warning is logged.

Row numbers: an index holds rows 0..N-1 (faiss ids = row numbers): the store's rows in order,
without the tuning query rows, then the tuning query rows (holdout_order).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")
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


class KoclipIndexError(ValueError):
    """Any index error that is the user's to fix (raised as one of the two below)."""


class IndexBuildError(KoclipIndexError):
    """An index that cannot be built as asked: no vectors, a budget too small, an unknown kind."""


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


# ---------------------------------------------------------------- choosing


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
    codebooks = nlist * dim * 4 + dim * dim * 4 + 256 * dim * 4  # IVF centroids, OPQ matrix, PQ centroids
    return n * (pq_m + 8 + (dim if refine else 0)) + codebooks


def _divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def choose_index(n: int, dim: int, max_memory: str | int = DEFAULT_MAX_MEMORY, kind: str = "auto") -> Plan:
    """The index for N vectors of dimension D within max_memory bytes; `kind` forces a type."""
    budget = parse_memory(max_memory)
    if kind not in ("auto", *KINDS):
        raise IndexBuildError(f"index kind must be one of auto, {', '.join(KINDS)}; got {kind!r}")
    if n <= 0:
        raise IndexBuildError("there are no vectors to index")
    flat, hnsw = estimate_memory("flat", n, dim), estimate_memory("hnsw", n, dim)
    if kind == "auto":
        if n <= FLAT_MAX_ROWS and flat <= budget:
            kind, why = "flat", f"{n} rows <= {FLAT_MAX_ROWS}: exact search"
        elif hnsw <= budget:
            kind, why = "hnsw", f"HNSW needs ~{format_bytes(hnsw)} <= budget {format_bytes(budget)}"
        else:
            kind, why = "ivfpq", f"HNSW would need ~{format_bytes(hnsw)} > budget {format_bytes(budget)}"
    else:
        why = "forced"
    if kind == "flat":
        return Plan("flat", "Flat", n, dim, flat, reason=why)
    if kind == "hnsw":
        return Plan("hnsw", f"HNSW{HNSW_M}", n, dim, hnsw, reason=why)
    if n < IVFPQ_MIN_ROWS:
        raise IndexBuildError(f"ivfpq needs at least {IVFPQ_MIN_ROWS} vectors to train on, there are {n}")
    nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39, 65536)))
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


def new_index(plan: Plan) -> faiss.Index:
    """An empty index for the plan (ivfpq still untrained)."""
    if plan.kind == "flat":
        return faiss.IndexFlatIP(plan.dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(plan.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    base = _ivf_part(index)
    opq = faiss.downcast_VectorTransform(base.chain.at(0))
    opq.niter, opq.max_train_points = 25, 32768  # faiss: 50 / 65536
    # index_factory turns on polysemous training (a code reordering for Hamming pre-filtering,
    # which we never search with); it is slower than the PQ training itself
    faiss.downcast_index(base.index).do_polysemous_training = False
    return index


def train(plan: Plan, sample: np.ndarray) -> faiss.Index:
    """A trained, empty ivfpq index (flat and hnsw need no training)."""
    index = new_index(plan)
    started = time.perf_counter()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    log.info("trained %s on %d rows in %.1fs", plan.factory, len(sample), time.perf_counter() - started)
    return index


def _ivf_part(index: faiss.Index) -> faiss.Index:
    """The OPQ+IVF-PQ part of an ivfpq index (the base of its Refine, if any)."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def add_vectors(index: faiss.Index, vectors: np.ndarray, start: int) -> None:
    """Append rows start, start+1, ... (ivfpq: ids given explicitly, so shards can be added apart)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not isinstance(faiss.downcast_index(index), (faiss.IndexRefine, faiss.IndexPreTransform)):
        index.add(vectors)
        return
    index = faiss.downcast_index(index)
    base = _ivf_part(index)
    base.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    if isinstance(index, faiss.IndexRefine):
        faiss.downcast_index(index.refine_index).add(vectors)
        index.ntotal = base.ntotal


def kind_of(index: faiss.Index) -> str:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    return "hnsw" if isinstance(index, faiss.IndexHNSW) else "ivfpq"


# ---------------------------------------------------------------- tuning


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """The rows of the k vectors with the largest inner product with each query (-1 past the end)."""
    return faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(vectors), k,
                     metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each query's true k nearest rows found among the index's first k."""
    total = 0.0
    for got, want in zip(found, truth):
        want = set(want[:k][want[:k] >= 0].tolist())
        total += len(set(got[:k].tolist()) & want) / len(want) if want else 1.0
    return total / len(truth) if len(truth) else 1.0


def set_search_params(index: faiss.Index, params: dict) -> None:
    index = faiss.downcast_index(index)
    if "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "k_factor" in params:
        index.k_factor = float(params["k_factor"])


@dataclass
class Tuning:
    params: dict
    recall: float
    reached: bool
    queries: int


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray,
         target_recall: float = DEFAULT_TARGET_RECALL) -> Tuning:
    """The cheapest search parameters reaching target_recall (module docstring) for queries whose
    exact top RECALL_K rows are `truth`; sets them on the index."""
    kind = kind_of(index)
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def measure(params: dict) -> float:
        set_search_params(index, params)
        return recall_at_k(index.search(queries, RECALL_K)[1], truth)

    def smallest(name: str, lo: int, hi: int, fixed: dict) -> tuple[int, bool]:
        value = lo
        while measure({**fixed, name: value}) < target_recall:  # doubling, then bisection
            if value >= hi:
                return hi, False
            lo, value = value, min(2 * value, hi)
        while value - lo > 1:
            mid = (lo + value) // 2
            lo, value = (lo, mid) if measure({**fixed, name: mid}) >= target_recall else (mid, value)
        return value, True

    if kind == "flat":
        params, reached = {}, True
    elif kind == "hnsw":
        ef, reached = smallest("efSearch", 16, 4096, {})
        params = {"efSearch": ef}
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        refine = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
        fixed = {"k_factor": KF_MAX} if refine else {}
        nprobe, reached = smallest("nprobe", 1, nlist, fixed)
        if refine and reached:
            kf, _ = smallest("k_factor", 1, KF_MAX, {"nprobe": nprobe})
            nprobe, _ = smallest("nprobe", 1, nprobe, {"k_factor": kf})
            fixed = {"k_factor": kf}
        params = {"nprobe": nprobe, **fixed}
    recall = measure(params)
    reached = reached and recall >= target_recall
    if not reached:
        log.warning("%s index reaches recall@%d %.3f < target %.3f even at %s", kind, RECALL_K, recall,
                    target_recall, params)
    return Tuning(params, recall, reached, len(queries))


# ---------------------------------------------------------------- re-using


def plan_of(index: faiss.Index, n: int, max_memory: int = DEFAULT_MAX_MEMORY) -> Plan:
    """The Plan an existing (or trained) index follows, for N rows."""
    kind, dim = kind_of(index), index.d
    if kind != "ivfpq":
        return choose_index(n, dim, max_memory, kind)
    ivf = faiss.extract_index_ivf(index)
    m, refine = faiss.downcast_index(ivf).pq.M, isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    factory = f"OPQ{m},IVF{ivf.nlist},PQ{m}" + (",Refine(SQ8)" if refine else "")
    size = estimate_memory("ivfpq", n, dim, nlist=ivf.nlist, pq_m=m, refine=refine)
    return Plan("ivfpq", factory, n, dim, size, nlist=ivf.nlist, pq_m=m, refine=refine, reason="given")


def copy_index(index: faiss.Index) -> faiss.Index:
    return faiss.deserialize_index(faiss.serialize_index(index))


def query_rows(n: int, queries: int, seed: int) -> np.ndarray:
    """The seeded sample of rows held out as tuning queries (the same for every build of N rows);
    at most half the rows, so that a small index is mostly built before it is tuned."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n // 2, queries), replace=False))


def train_rows(plan: Plan, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed + 1).choice(plan.n, plan.train_rows, replace=False))


def holdout_order(n: int, held_out: np.ndarray) -> np.ndarray:
    """Store rows in index order: every row but the held-out query rows, then those."""
    rest = np.ones(n, bool)
    rest[held_out] = False
    return np.concatenate([np.flatnonzero(rest), np.asarray(held_out, dtype=np.int64)])


def add_truth(heap: faiss.ResultHeap, queries: np.ndarray, vectors: np.ndarray, start: int) -> None:
    """Offer rows start.. (`vectors`) to the queries' exact top-k heap (faiss.ResultHeap, max IP)."""
    if len(vectors) and len(queries):
        scores, rows = faiss.knn(queries, vectors, min(len(vectors), RECALL_K), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))


def build_and_tune(plan: Plan, vectors: np.ndarray, held_out: np.ndarray,
                   target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0, trained: faiss.Index | None = None,
                   chunk: int = 65536) -> tuple[faiss.Index, faiss.Index | None, Tuning, np.ndarray]:
    """(index, trained or None, tuning, order): `vectors` indexed in holdout_order (order[r] is the
    input row of index row r), tuned on the held-out query rows before they were added."""
    order = holdout_order(len(vectors), held_out)
    rest = len(vectors) - len(held_out)
    queries = np.ascontiguousarray(vectors[held_out], dtype=np.float32)
    if plan.kind == "ivfpq":
        trained = trained if trained is not None else train(plan, vectors[train_rows(plan, seed)])
        index = copy_index(trained)
    else:
        index = new_index(plan)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True)
    for start in range(0, rest, chunk):  # in chunks: no second copy of the corpus
        part = vectors[order[start:min(start + chunk, rest)]]
        add_vectors(index, part, start)
        add_truth(heap, queries, part, start)
        log.info("%s: added %d/%d rows", plan.kind, start + len(part), len(vectors))
    heap.finalize()
    tuning = tune(index, queries, heap.I, target_recall)
    add_vectors(index, queries, rest)
    return index, trained, tuning, order


def remove_rows(index: faiss.Index, removed: np.ndarray) -> None:
    """Drop the rows where `removed` is True and renumber the others 0..n-1, keeping their order
    (flat: faiss compacts itself; ivfpq: the inverted lists' ids are rewritten). Not for hnsw."""
    gone = np.flatnonzero(removed).astype(np.int64)
    if not len(gone):
        return
    index = faiss.downcast_index(index)
    if kind_of(index) == "hnsw":
        raise ValueError("HNSW indexes cannot remove vectors; rebuild them")
    selector = faiss.IDSelectorBatch(gone)
    if kind_of(index) == "flat":
        index.remove_ids(selector)
        return
    from faiss.contrib.inspect_tools import get_invlist

    base = _ivf_part(index)
    base.remove_ids(selector)
    new_ids = np.cumsum(~np.asarray(removed, bool)) - 1  # old row -> new row, for kept rows
    invlists = faiss.extract_index_ivf(base).invlists
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            ids, codes = get_invlist(invlists, list_no)
            fresh = np.ascontiguousarray(new_ids[ids], dtype=np.int64)
            invlists.update_entries(list_no, 0, size, faiss.swig_ptr(fresh), faiss.swig_ptr(codes))
    if isinstance(index, faiss.IndexRefine):
        faiss.downcast_index(index.refine_index).remove_ids(selector)
        index.ntotal = base.ntotal


def in_memory(index: faiss.Index) -> faiss.Index:
    """An ivfpq index whose inverted lists live on disk (the distributed build's layout), with its
    lists copied into memory so it can be changed and serialised as one file."""
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return index
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for list_no in range(ivf.nlist):
        if ivf.invlists.list_size(list_no):
            ids, codes = get_invlist(ivf.invlists, list_no)
            lists.add_entries(list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    return index
