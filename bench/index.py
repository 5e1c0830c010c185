"""FAISS index types side by side on synthetic vectors, and what the automatic choice published.

One run builds, on the same N x D vectors, what koclip.index.build_index does with kind "auto"
(koclip.index.build.choose_and_build over koclip.index.plan.candidates: every kind that fits
--max-memory, each tuned on --queries corpus rows held out of the index, the fastest reaching
--target-recall by its own single-query latency published; exact flat only when none does),
measuring every candidate it tried; then every other kind of --kinds it did not try, built and
tuned the same way (forced), so that each kind's best tuned point is in the table. For each:

  build_s        training (IVF kinds), adding the vectors and tuning, wall seconds;
  index_mb       the serialised index (faiss.serialize_index), what a query process holds;
  params         the tuned search parameters: the smallest reaching the target, else the largest tried;
  recall@10      "tuning": on the held-out corpus rows it was tuned on; "fresh": on --held-out
                 fresh vectors from the same generator (another seed), against exact search;
  p50/p99 ms     single-query latency: the first --latency-queries fresh vectors searched one at a
                 time (batch of 1, k=10) with the tuned parameters, on --latency-threads FAISS
                 (OpenMP) threads, 1 by default: a server answers concurrent queries one per core.
                 (latency_tuning_ms in the JSON: the median auto compared, over 100 tuning queries.)
                 Builds and the batched tuning searches use every core. "x flat" divides flat's p50
                 by the row's.
The "auto" row is the index build_index would publish (its build_s: every candidate auto tried).
The last lines say whether its fresh recall reaches the target and how its speed compares with
the fastest kind whose fresh recall does.

--data current (clustered_vectors): 256 random unit centres; each vector is a centre plus a
Gaussian offset of norm ~0.5 inside a random 64-dimensional subspace shared by all clusters,
plus isotropic noise of norm ~0.05, then L2-normalised.
--data hard (hard_vectors, issue 17): 1,000 random unit centres plus isotropic Gaussian noise of
sigma 0.125 per dimension (norm ~2.8 at D=512: nearly isotropic), then L2-normalised; here HNSW
and IVF-PQ stop short of recall@10 0.95 at any setting tuning tries.
The figures depend on these choices.

    python -m bench.index                           # 1M x 512, current data
    python -m bench.index --data hard               # 1M x 512, hard data (~tens of minutes)
    python -m bench.index --data hard --n 20000     # a smoke run
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
from koclip.index.build import Attempt, choose_and_build
from koclip.index.corpus import Corpus
from koclip.index.faiss_ops import exact_neighbours
from koclip.index.plan import DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, RECALL_K, candidates, parse_memory, plan_for
from koclip.index.tuning import holdout_order, latencies_ms, query_rows, recall_at_k, set_search_params

RESULTS = Path(__file__).resolve().parent / "results"


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


def hard_vectors(n: int, dim: int, centres: int = 1000, sigma: float = 0.125, seed: int = 0,
                 chunk: int = 65536) -> np.ndarray:
    """float32 [n, dim] unit vectors: a random unit centre plus N(0, sigma^2) per dimension (module
    docstring); the centres are the same for every seed."""
    centre = np.random.default_rng(0).standard_normal((centres, dim)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centre[rng.integers(0, centres, m)] + rng.standard_normal((m, dim), dtype=np.float32) * sigma
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


GENERATORS = {"current": clustered_vectors, "hard": hard_vectors}
GENERATOR_PARAMS = {"current": {"centres": 256, "intrinsic_dim": 64, "spread": 0.5, "noise": 0.05},
                    "hard": {"centres": 1000, "sigma": 0.125}}


def evaluate(index: faiss.Index, params: dict, fresh: np.ndarray, fresh_truth: np.ndarray, args) -> dict:
    """Fresh-query recall@10 and single-query latency with `params` set."""
    set_search_params(index, params)
    recall = recall_at_k(index.search(fresh, RECALL_K)[1], fresh_truth)
    lat = latencies_ms(index, fresh[:args.latency_queries], args.latency_threads)
    return {"params": params, "recall_fresh": round(recall, 4), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "latency_queries": len(lat)}


def row(attempt, index: faiss.Index, tried_by: str, fresh, fresh_truth, args) -> dict:
    plan, tuning = attempt.plan, attempt.tuning
    out = {"kind": plan.kind, "factory": plan.factory, "tried_by": tried_by, "build_s": round(attempt.seconds, 2),
           "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1),
           "estimated_mb": round(plan.estimated_bytes / 2**20, 1), "recall_tuning": round(tuning.recall, 4),
           "target_reached": tuning.reached, "latency_tuning_ms": round(tuning.latency_ms, 3),
           **evaluate(index, tuning.params, fresh, fresh_truth, args)}
    print(f"[{plan.kind}] {plan.factory} built and tuned in {attempt.seconds:.1f}s ({tried_by}): {out['params']}, "
          f"recall {out['recall_tuning']:.3f} (fresh {out['recall_fresh']:.3f}), p50 {out['p50_ms']} ms", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(GENERATORS), default="current", help="the vectors (see above)")
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default: 1M)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default: 512)")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq,ivfsq8,ivfflat",
                        help="kinds measured besides what auto tried (comma-separated; flat always)")
    parser.add_argument("--max-memory", default="4GB", help="the memory budget (default: 4GB)")
    parser.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="tuning queries (corpus rows)")
    parser.add_argument("--held-out", type=int, default=1000, help="fresh vectors for the fresh recall")
    parser.add_argument("--latency-queries", type=int, default=200, help="of those, searched one at a time")
    parser.add_argument("--latency-threads", type=int, default=1, help="FAISS threads for single queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON output (default: bench/results/index.json, index-hard.json for hard)")
    args = parser.parse_args(argv)
    args.max_memory = parse_memory(args.max_memory)
    out = args.out or str(RESULTS / ("index.json" if args.data == "current" else f"index-{args.data}.json"))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    kinds = ["flat"] + [k for k in kinds if k != "flat"]  # the baseline every speed-up is relative to

    load_start, snap = load_average(), cpu_snapshot()
    generate = GENERATORS[args.data]
    start = time.perf_counter()
    vectors = generate(args.n, args.dim, seed=args.seed)
    fresh = generate(args.held_out, args.dim, seed=args.seed + 1000)
    generate_s = time.perf_counter() - start
    held_out_rows = query_rows(args.n, args.queries, args.seed)
    index_row = np.empty(args.n, np.int64)
    index_row[holdout_order(args.n, held_out_rows)] = np.arange(args.n)  # store row -> index row
    start = time.perf_counter()
    fresh_truth = index_row[exact_neighbours(fresh, vectors)]
    truth_s = time.perf_counter() - start
    print(f"{args.data} data: {args.n} x {args.dim} vectors in {generate_s:.1f}s; exact neighbours of "
          f"{len(fresh)} fresh queries in {truth_s:.1f}s", flush=True)

    corpus, rows = Corpus(vectors=vectors), []
    plans = candidates(args.n, args.dim, args.max_memory)
    print(f"auto candidates: {', '.join(p.factory for p in plans)}", flush=True)
    start = time.perf_counter()
    chosen, index, _, tuning, _, attempts = choose_and_build(
        plans, corpus, held_out_rows, args.target_recall, args.seed, args.max_memory, forced=False,
        allow_below_target=True, on_attempt=lambda a, ix: rows.append(row(a, ix, "auto", fresh, fresh_truth, args)))
    auto_s = time.perf_counter() - start
    auto = {**next(r for r in rows if r["kind"] == chosen.kind), "kind": "auto", "published": chosen.kind,
            "build_s": round(auto_s, 2)}
    del index
    for kind in kinds:
        if any(r["kind"] == kind for r in rows):
            continue
        plan = plan_for(kind, args.n, args.dim, args.max_memory)
        print(f"[{kind}] building {plan.factory} (not tried by auto) ...", flush=True)
        start = time.perf_counter()
        index, _, kind_tuning, _ = corpus.build(plan, held_out_rows, args.target_recall, args.seed, None)
        rows.append(row(Attempt(plan, kind_tuning, time.perf_counter() - start), index, "bench", fresh, fresh_truth,
                        args))
        rows[-1]["within_budget"] = plan.estimated_bytes <= args.max_memory
        del index
    rows.append(auto)
    flat_p50 = next(r["p50_ms"] for r in rows if r["kind"] == "flat")
    for r in rows:
        r["speedup_vs_flat"] = round(flat_p50 / r["p50_ms"], 1) if r["p50_ms"] else None
    other = other_load(snap, cpu_snapshot())
    print_table(["kind", "factory", "tried by", "build s", "index MB", "params", "recall@10 tuning",
                 "recall@10 fresh", "p50 ms", "p99 ms", "x flat"],
                [[r["kind"] if r["kind"] != "auto" else f"auto={r['published']}", r["factory"], r["tried_by"],
                  r["build_s"], r["index_mb"], " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-",
                  r["recall_tuning"], r["recall_fresh"], r["p50_ms"], r["p99_ms"], r["speedup_vs_flat"]]
                 for r in rows])
    meeting = [r for r in rows if r["kind"] != "auto" and r["recall_fresh"] >= args.target_recall
               and r.get("within_budget", True)]
    fastest = min(meeting, key=lambda r: r["p50_ms"]) if meeting else None
    verdict = {"auto_published": chosen.kind, "auto_recall_fresh": auto["recall_fresh"],
               "auto_reaches_target_fresh": auto["recall_fresh"] >= args.target_recall,
               "auto_p50_ms": auto["p50_ms"], "fastest_meeting_target_fresh": fastest and fastest["kind"],
               "fastest_p50_ms": fastest and fastest["p50_ms"],
               "auto_p50_over_fastest": fastest and round(auto["p50_ms"] / fastest["p50_ms"], 3),
               "auto_tried": [a.plan.kind for a in attempts]}
    print(f"auto tried {', '.join(verdict['auto_tried'])} and published {chosen.kind}: fresh recall@10 "
          f"{auto['recall_fresh']} (target {args.target_recall}), p50 {auto['p50_ms']} ms; fastest kind within the "
          f"budget whose fresh recall reaches the target: "
          + (f"{fastest['kind']} at p50 {fastest['p50_ms']} ms (auto's p50 / that: {verdict['auto_p50_over_fastest']})"
             if fastest else "none"))
    print(f"budget {args.max_memory / 2**30:.1f} GB; faiss threads {faiss.omp_get_max_threads()} "
          f"(single queries: {args.latency_threads}); "
          f"load average {load_start} -> {load_average()}; other processes kept {other:.2f} cores busy")
    data = {
        "benchmark": "index", "data": args.data, "n": args.n, "dim": args.dim, "max_memory": args.max_memory,
        "target_recall": args.target_recall, "tuning_queries": len(held_out_rows),
        "fresh_queries": args.held_out, "latency_queries": args.latency_queries, "seed": args.seed,
        "vectors": {"generator": f"bench.index.{generate.__name__}", **GENERATOR_PARAMS[args.data],
                    "generate_s": round(generate_s, 1)},
        "exact_truth_s": round(truth_s, 1), "faiss_threads": faiss.omp_get_max_threads(),
        "latency_threads": args.latency_threads,
        "load_average_start": load_start, "load_average_end": load_average(),
        "other_processes_cores_busy": round(other, 2),
        "machine": machine_info(faiss=faiss.__version__, numpy=np.__version__),
        "verdict": verdict, "rows": rows,
    }
    print(f"wrote {write_json(out, data)}")
    return data


if __name__ == "__main__":
    main()
