"""FAISS index types side by side on synthetic clustered vectors: build, memory, recall, latency.

One run builds, on the same N x D vectors, each index type koclip.index can choose (exact flat,
HNSW, OPQ+IVF-PQ, each forced, with the parameters choose_index picks for N, D and --max-memory),
tunes each with koclip.index_faiss.tune to --target-recall and measures:

  build_s        adding the vectors (and training, for ivfpq), wall seconds;
  peak_rss_mb    the process's peak resident memory during the build minus its resident memory
                 before it (Linux /proc/self/status VmHWM, reset through /proc/self/clear_refs; FAISS
                 allocates outside Python, so tracemalloc would not see it). The input vectors are
                 allocated before, so they are not counted;
  index_mb       the serialised index (faiss.serialize_index), what a query process holds;
  recall@10      "tune": on the tuning queries (corpus rows, own row excluded; what meta.json
                 records); "held-out": on --latency-queries fresh vectors from the same generator
                 (another seed), not in the index, against exact search;
  p50/p99 ms     single-query latency: the held-out vectors searched one at a time (batch of 1,
                 k=10), with the tuned parameters, on --latency-threads FAISS (OpenMP) threads,
                 1 by default: a server answers concurrent queries one per core. (Flat search
                 splits one query over the threads; on this shared 2-core machine 2 threads made
                 a 200k x 512 flat query 5x *slower*, 72-80 ms against 15 ms, from OpenMP
                 synchronisation when another process holds a core.) Builds and the batched
                 tuning searches use every core. "x flat" divides flat's p50 by the row's.

Vectors (clustered_vectors): C random unit centres; each vector is a centre plus a Gaussian
offset of norm ~`spread` inside a random `intrinsic_dim`-dimensional subspace shared by all
clusters, plus isotropic noise of norm ~`noise`, then L2-normalised. Real CLIP embeddings are not
isotropic either; the subspace keeps the neighbour structure from being pure high-dimensional
noise, where every ANN method degrades. The figures depend on this choice.

    python -m bench.index                    # 1M x 512: ~20 min on 2 cores
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
from koclip import index_faiss as kf

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


def measure(kind: str, vectors: np.ndarray, args, tuning_rows, tuning_truth, held_out, held_truth) -> dict:
    plan = kf.choose_index(len(vectors), vectors.shape[1], args.max_memory, kind)
    print(f"[{kind}] building {plan.factory} ...", flush=True)
    before = reset_peak_rss()
    start = time.perf_counter()
    index, _ = kf.build_from_vectors(plan, vectors, seed=args.seed)
    build_s = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    start = time.perf_counter()
    tuning = kf.tune(index, vectors[tuning_rows], tuning_rows, tuning_truth, args.target_recall)
    tune_s = time.perf_counter() - start
    found = index.search(held_out, kf.RECALL_K)[1]
    held = kf.recall_at_k(found, held_truth, np.full(len(held_out), -1))
    lat = latencies_ms(index, held_out, args.latency_threads)
    size = len(faiss.serialize_index(index))
    row = {"kind": kind, "factory": plan.factory, "build_s": round(build_s, 2), "tune_s": round(tune_s, 2),
           "peak_rss_mb": round((peak - before) / 1024, 1) if before is not None and peak else None,
           "index_mb": round(size / 2**20, 1), "estimated_mb": round(plan.estimated_bytes / 2**20, 1),
           "within_budget": size <= args.max_memory, "params": tuning.params,
           "recall_tune": round(tuning.recall, 4), "recall_held_out": round(held, 4),
           "target_reached": tuning.reached, "p50_ms": round(float(np.percentile(lat, 50)), 3),
           "p99_ms": round(float(np.percentile(lat, 99)), 3), "latency_queries": len(lat)}
    del index
    print(f"[{kind}] built in {build_s:.1f}s, recall {tuning.recall:.3f} at {tuning.params}, "
          f"p50 {row['p50_ms']} ms", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default: 1M)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default: 512)")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated index types")
    parser.add_argument("--max-memory", default="4GB", help="budget for choose_index (default: 4GB)")
    parser.add_argument("--target-recall", type=float, default=kf.DEFAULT_TARGET_RECALL)
    parser.add_argument("--queries", type=int, default=kf.DEFAULT_QUERIES, help="tuning queries (corpus rows)")
    parser.add_argument("--latency-queries", type=int, default=200, help="held-out single queries")
    parser.add_argument("--latency-threads", type=int, default=1, help="FAISS threads for single queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.max_memory = kf.parse_memory(args.max_memory)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "flat" not in kinds:
        kinds.insert(0, "flat")  # the baseline every speed-up is relative to

    load_start, snap = load_average(), cpu_snapshot()
    start = time.perf_counter()
    vectors = clustered_vectors(args.n, args.dim, seed=args.seed)
    held_out = clustered_vectors(args.latency_queries, args.dim, seed=args.seed + 1000)
    generate_s = time.perf_counter() - start
    tuning_rows = kf.query_rows(args.n, args.queries, args.seed)
    start = time.perf_counter()
    tuning_truth = kf.exact_neighbours(vectors[tuning_rows], vectors)
    held_truth = kf.exact_neighbours(held_out, vectors, kf.RECALL_K)
    truth_s = time.perf_counter() - start
    print(f"{args.n} x {args.dim} vectors in {generate_s:.1f}s; exact neighbours of "
          f"{len(tuning_rows) + len(held_out)} queries in {truth_s:.1f}s", flush=True)

    rows = [measure(k, vectors, args, tuning_rows, tuning_truth, held_out, held_truth) for k in kinds]
    flat_p50 = rows[0]["p50_ms"]
    for row in rows:
        row["speedup_vs_flat"] = round(flat_p50 / row["p50_ms"], 1) if row["p50_ms"] else None
    other = other_load(snap, cpu_snapshot())
    print_table(["kind", "factory", "build s", "peak MB", "index MB", "params", "recall@10 tune",
                 "recall@10 held-out", "p50 ms", "p99 ms", "x flat"],
                [[r["kind"], r["factory"], r["build_s"], r["peak_rss_mb"], r["index_mb"],
                  " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-", r["recall_tune"],
                  r["recall_held_out"], r["p50_ms"], r["p99_ms"], r["speedup_vs_flat"]] for r in rows])
    print(f"budget {args.max_memory / 2**30:.1f} GB; faiss threads {faiss.omp_get_max_threads()} "
          f"(single queries: {args.latency_threads}); "
          f"load average {load_start} -> {load_average()}; other processes kept {other:.2f} cores busy")
    data = {
        "benchmark": "index", "n": args.n, "dim": args.dim, "max_memory": args.max_memory,
        "target_recall": args.target_recall, "tuning_queries": len(tuning_rows),
        "latency_queries": args.latency_queries, "seed": args.seed,
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
