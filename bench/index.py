"""FAISS index types side by side on synthetic clustered vectors: build, memory, recall, latency.

One run builds, on the same N x D vectors, each index type koclip.index can choose (exact flat,
HNSW, OPQ+IVF-PQ, each forced, with the parameters choose_index picks for N, D and --max-memory)
the way build_index does (koclip.index.build_and_tune: --queries corpus rows held out of the
index while the search parameter is tuned to --target-recall, then added) and measures:

  build_s        training (ivfpq), adding the vectors and tuning, wall seconds;
  peak_rss_mb    the process's peak resident memory during the build minus its resident memory
                 before it (Linux /proc/self/status VmHWM, reset through /proc/self/clear_refs; FAISS
                 allocates outside Python, so tracemalloc would not see it). The input vectors are
                 allocated before, so they are not counted;
  index_mb       the serialised index (faiss.serialize_index), what a query process holds;
  recall@10      "tuning": on the queries the parameter was tuned on; "held-out": on --held-out
                 fresh vectors from the same generator (another seed), against exact search;
  tuned on       "corpus rows (koclip)": what build_index does and meta.json records; "fresh
                 vectors": the same index re-tuned on --queries other fresh vectors, a check that
                 the held-out corpus rows stand for new vectors;
  p50/p99 ms     single-query latency: the first --latency-queries held-out vectors searched one
                 at a time (batch of 1, k=10) with the tuned parameters, on --latency-threads
                 FAISS (OpenMP) threads, 1 by default: a server answers concurrent queries one per
                 core. (Flat search splits one query over the threads; when another process holds
                 a core, OpenMP's synchronisation can make 2 threads slower than 1 on this shared
                 machine: compare --latency-threads 2.) Builds and the batched tuning searches use
                 every core. "x flat" divides flat's p50 by the row's.

Vectors (clustered_vectors): C random unit centres; each vector is a centre plus a Gaussian
offset of norm ~`spread` inside a random `intrinsic_dim`-dimensional subspace shared by all
clusters, plus isotropic noise of norm ~`noise`, then L2-normalised. Real CLIP embeddings are not
isotropic either; the subspace keeps the neighbour structure from being pure high-dimensional
noise, where every ANN method degrades. The figures depend on this choice.

    python -m bench.index                    # 1M x 512: ~15 min on 2 cores
    python -m bench.index --n 20000          # a smoke run, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/index.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss
import numpy as np

from bench.common import cpu_snapshot, load_average, machine_info, other_load, print_table, write_json
from koclip.index.faiss_ops import exact_neighbours
from koclip.index.plan import DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, RECALL_K, choose_index, parse_memory
from koclip.index.tuning import build_and_tune, holdout_order, query_rows, recall_at_k, set_search_params, tune

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "index.json"


def clustered_vectors(n: int, dim: int, centres: int = 256, intrinsic_dim: int = 64, spread: float = 0.5,
                      noise: float = 0.05, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """float32 [n, dim] unit vectors around `centres` random centres (module docstring)."""
    structure = np.random.default_rng(0)  # the same clusters for every seed: seeds give new samples
    centre = structure.standard_normal((centres, dim)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    basis = np.linalg.qr(structure.standard_normal((dim, min(intrinsic_dim, dim))))[0].T.astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centre[rng.integers(0, centres, m)]
        x += (rng.standard_normal((m, len(basis)), dtype=np.float32) * (spread / np.sqrt(len(basis)))) @ basis
        x += rng.standard_normal((m, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset VmHWM to the current RSS; returns the current RSS in kB (None off Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def latencies_ms(index: faiss.Index, queries: np.ndarray, threads: int, k: int = 10) -> np.ndarray:
    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        times = []
        for q in queries:
            start = time.perf_counter()
            index.search(q[None], k)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        faiss.omp_set_num_threads(build_threads)
    return np.array(times)


def evaluate(index: faiss.Index, params: dict, held_out: np.ndarray, held_truth: np.ndarray, args) -> dict:
    """Held-out recall@10 and single-query latency with `params` set."""
    set_search_params(index, params)
    recall = recall_at_k(index.search(held_out, RECALL_K)[1], held_truth)
    lat = latencies_ms(index, held_out[:args.latency_queries], args.latency_threads)
    return {"params": params, "recall_held_out": round(recall, 4), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "latency_queries": len(lat)}


def measure(kind: str, vectors: np.ndarray, args, held_out_rows, held_out, held_truth, held_tune,
            held_tune_truth) -> list[dict]:
    """One row with koclip's own build and tuning (koclip.index.build_and_tune: corpus rows held
    out, then added); for hnsw and ivfpq a second row tuned on fresh vectors instead. The truths
    are row numbers of the index (its holdout order)."""
    plan = choose_index(len(vectors), vectors.shape[1], args.max_memory, kind)
    print(f"[{kind}] building {plan.factory} ...", flush=True)
    before = reset_peak_rss()
    start = time.perf_counter()
    index, _, tuning, _ = build_and_tune(plan, vectors, held_out_rows, args.target_recall, args.seed)
    build_s = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    size = len(faiss.serialize_index(index))
    common = {"kind": kind, "factory": plan.factory, "build_s": round(build_s, 2),
              "peak_rss_mb": round((peak - before) / 1024, 1) if before is not None and peak else None,
              "index_mb": round(size / 2**20, 1), "estimated_mb": round(plan.estimated_bytes / 2**20, 1),
              "within_budget": size <= args.max_memory}
    rows = [{**common, "tuned_on": "corpus rows (koclip)", "recall_tuning": round(tuning.recall, 4),
             "target_reached": tuning.reached, **evaluate(index, tuning.params, held_out, held_truth, args)}]
    if kind != "flat":
        tuning = tune(index, held_tune, held_tune_truth, args.target_recall)
        rows.append({**common, "tuned_on": "fresh vectors", "recall_tuning": round(tuning.recall, 4),
                     "target_reached": tuning.reached, **evaluate(index, tuning.params, held_out, held_truth, args)})
    del index
    for row in rows:
        print(f"[{kind}] built (and tuned) in {build_s:.1f}s; tuned on {row['tuned_on']}: {row['params']}, "
              f"recall {row['recall_tuning']:.3f} (held-out {row['recall_held_out']:.3f}), p50 {row['p50_ms']} ms",
              flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default: 1M)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default: 512)")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated index types")
    parser.add_argument("--max-memory", default="4GB", help="budget for choose_index (default: 4GB)")
    parser.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="tuning queries (corpus rows)")
    parser.add_argument("--held-out", type=int, default=1000, help="fresh vectors for the held-out recall")
    parser.add_argument("--latency-queries", type=int, default=200, help="of those, searched one at a time")
    parser.add_argument("--latency-threads", type=int, default=1, help="FAISS threads for single queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.max_memory = parse_memory(args.max_memory)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "flat" not in kinds:
        kinds.insert(0, "flat")  # the baseline every speed-up is relative to

    load_start, snap = load_average(), cpu_snapshot()
    start = time.perf_counter()
    vectors = clustered_vectors(args.n, args.dim, seed=args.seed)
    held_out = clustered_vectors(args.held_out, args.dim, seed=args.seed + 1000)
    held_tune = clustered_vectors(args.queries, args.dim, seed=args.seed + 2000)
    generate_s = time.perf_counter() - start
    held_out_rows = query_rows(args.n, args.queries, args.seed)
    index_row = np.empty(args.n, np.int64)
    index_row[holdout_order(args.n, held_out_rows)] = np.arange(args.n)  # store row -> index row
    start = time.perf_counter()
    held_truth = index_row[exact_neighbours(held_out, vectors)]
    held_tune_truth = index_row[exact_neighbours(held_tune, vectors)]
    truth_s = time.perf_counter() - start
    print(f"{args.n} x {args.dim} vectors in {generate_s:.1f}s; exact neighbours of "
          f"{len(held_out) + len(held_tune)} fresh queries in {truth_s:.1f}s", flush=True)

    rows = [row for k in kinds
            for row in measure(k, vectors, args, held_out_rows, held_out, held_truth, held_tune, held_tune_truth)]
    flat_p50 = rows[0]["p50_ms"]
    for row in rows:
        row["speedup_vs_flat"] = round(flat_p50 / row["p50_ms"], 1) if row["p50_ms"] else None
    other = other_load(snap, cpu_snapshot())
    print_table(["kind", "factory", "build s", "peak MB", "index MB", "tuned on", "params", "recall@10 tuning",
                 "recall@10 held-out", "p50 ms", "p99 ms", "x flat"],
                [[r["kind"], r["factory"], r["build_s"], r["peak_rss_mb"], r["index_mb"], r["tuned_on"],
                  " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-", r["recall_tuning"],
                  r["recall_held_out"], r["p50_ms"], r["p99_ms"], r["speedup_vs_flat"]] for r in rows])
    print(f"budget {args.max_memory / 2**30:.1f} GB; faiss threads {faiss.omp_get_max_threads()} "
          f"(single queries: {args.latency_threads}); "
          f"load average {load_start} -> {load_average()}; other processes kept {other:.2f} cores busy")
    data = {
        "benchmark": "index", "n": args.n, "dim": args.dim, "max_memory": args.max_memory,
        "target_recall": args.target_recall, "tuning_queries": len(held_out_rows),
        "held_out_tuning_queries": len(held_tune),
        "held_out_queries": args.held_out, "latency_queries": args.latency_queries, "seed": args.seed,
        "vectors": {"generator": "bench.index.clustered_vectors", "centres": 256, "intrinsic_dim": 64,
                    "spread": 0.5, "noise": 0.05, "generate_s": round(generate_s, 1)},
        "exact_truth_s": round(truth_s, 1), "faiss_threads": faiss.omp_get_max_threads(),
        "latency_threads": args.latency_threads,
        "load_average_start": load_start, "load_average_end": load_average(),
        "other_processes_cores_busy": round(other, 2),
        "machine": machine_info(faiss=faiss.__version__, numpy=np.__version__),
        "rows": rows,
    }
    print(f"wrote {write_json(args.out, data)}")
    return data


if __name__ == "__main__":
    main()
