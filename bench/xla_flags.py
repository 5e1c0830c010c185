"""Which XLA:CPU options make our encoders faster: bench.encoders under each set of XLA_FLAGS.

  python -m bench.xla_flags [--only image] [--dtypes bfloat16] [--rounds 2] [--sets base,onednn,...]

XLA reads XLA_FLAGS once, when its CPU backend starts, so every flag set runs bench.encoders in
a process of its own. The sets are tried round-robin for --rounds rounds and each keeps its best
row: on a shared machine that evens out the drift between the first and the last set. Each
process measures transformers' PyTorch model too, at the same moment, so `ours/torch` compares
like with like even when the machine is busy.

The candidate sets are the CPU backend's matmul paths of jaxlib 0.10 (the `xla_cpu_*` flags its
shared library names): its default, oneDNN thunks and custom calls for matmul fusions, oneDNN /
XNNPACK / YNNPACK fusions of dots, XNNPACK subgraph fusion, fast math, and YNNPACK turned off.
In jaxlib 0.10.2's default a bf16 x bf16 -> f32 dot is a YNNPACK fusion (`__ynn_fusion` in
`XLA_FLAGS=--xla_dump_to=D --xla_dump_hlo_as_text`). On the idle 2-core AMX Xeon of 2026-12-04
(bench/results/xla_flags-xeon-amx.json) a 2048^2 bf16 matmul ran at 1233 GFLOP/s in it, 304 with
YNNPACK off, 2104 in torch (oneDNN); the oneDNN flags leave the dot to YNNPACK (1292).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.common import machine_info, print_table, write_json

FLAG_SETS = {
    "base": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "onednn_call": "--xla_cpu_experimental_onednn_custom_call=true --xla_cpu_use_onednn=true",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",  # dots back to Eigen: shows what YNNPACK brings
}
DEFAULT_OUT = "bench/results/xla_flags.json"


def run_encoders(flags: str, args, out: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))}
    cmd = [sys.executable, "-m", "bench.encoders", "--only", args.only, "--dtypes", args.dtypes,
           "--repeats", str(args.repeats), "--out", out] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    with open(out) as f:
        return json.load(f)


def better(old: dict | None, new: dict) -> dict:
    """Per (dtype, framework), the faster row of two runs; the matmul peaks, the higher."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    rows = {(r["dtype"], r["framework"]): r for r in old["rows"]}
    for r in new["rows"]:
        key = (r["dtype"], r["framework"])
        if r["items_per_s"] > rows[key]["items_per_s"]:
            rows[key] = r
    peaks = {k: max(v, new["matmul_peak_gflops"]["runs"][k]) for k, v in old["matmul_peak_gflops"]["runs"].items()}
    return {**old, "rows": list(rows.values()), "matmul_peak_gflops": {**old["matmul_peak_gflops"], "runs": peaks}}


def summary_rows(name: str, result: dict) -> list[dict]:
    if "error" in result:
        return [{"set": name, "flags": FLAG_SETS[name], "error": result["error"]}]
    by = {(r["dtype"], r["framework"].split()[0]): r for r in result["rows"]}
    peaks = result["matmul_peak_gflops"]["runs"]
    out = []
    for dtype in sorted({d for d, _ in by}, key=lambda d: d != "float32"):
        ours, torch = by[(dtype, "ours")], by.get((dtype, "transformers"))  # torch: None without native bf16
        out.append({"set": name, "flags": FLAG_SETS[name], "tower": ours["tower"], "dtype": dtype,
                    "ours_items_per_s": ours["items_per_s"],
                    "torch_items_per_s": torch["items_per_s"] if torch else float("nan"),
                    "ours_over_torch": ours["items_per_s"] / torch["items_per_s"] if torch else float("nan"),
                    "jax_peak_gflops": peaks["jax float32" if dtype == "float32" else "jax bfloat16->f32"],
                    "torch_peak_gflops": peaks.get(f"torch {dtype}", float("nan")),
                    "busy_cores": ours["other_processes_cores"]})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.xla_flags", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="image", choices=("image", "text", "cliptext"), help="tower (default image)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default %(default)s)")
    p.add_argument("--sets", default=",".join(FLAG_SETS), help="comma-separated flag sets (default: all)")
    p.add_argument("--rounds", type=int, default=2, help="round-robin rounds, best kept (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per row in each run (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny configs (a smoke run)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path (default %(default)s)")
    args = p.parse_args(argv)
    names = args.sets.split(",")
    unknown = [n for n in names if n not in FLAG_SETS]
    if unknown:
        p.error(f"unknown flag sets {unknown}; known: {', '.join(FLAG_SETS)}")
    best: dict[str, dict | None] = dict.fromkeys(names)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in names:
                best[name] = better(best[name], run_encoders(FLAG_SETS[name], args, os.path.join(tmp, f"{name}.json")))
                print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    rows = [row for name in names for row in summary_rows(name, best[name])]
    print(f"\n{args.only} tower, best of {args.rounds} rounds x {args.repeats} batches; peaks: 2048^2 matmul GFLOP/s "
          "(bfloat16: jax bf16->f32); busy = cores used by other processes")
    print_table(["set", "dtype", "ours items/s", "torch items/s", "ours/torch", "jax peak", "torch peak", "busy"],
                [(r["set"], r.get("dtype", ""), f"{r['ours_items_per_s']:.2f}" if "error" not in r else r["error"][:60],
                  f"{r['torch_items_per_s']:.2f}" if "error" not in r else "",
                  f"{r['ours_over_torch']:.2f}" if "error" not in r else "",
                  f"{r['jax_peak_gflops']:.0f}" if "error" not in r else "",
                  f"{r['torch_peak_gflops']:.0f}" if "error" not in r else "",
                  f"{r['busy_cores']:.1f}" if "error" not in r else "") for r in rows])
    result = {"machine": machine_info(), "settings": vars(args), "flag_sets": FLAG_SETS, "rows": rows}
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
