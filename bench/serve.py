"""Bounded loopback load on `python -m koclip.serve`: N concurrent clients x M text queries each.

For each mode (micro-batching on, batching off) a server subprocess is started on 127.0.0.1 over
a random-init model (`--model-size`) and a flat index of random vectors carrying its
fingerprint; once /readyz says ready, each client count in --clients runs: every client sends
--requests POST /knn-service queries one after another (keep-alive, one aiohttp session; all
clients in one asyncio loop) and the level ends when all are answered. Reported per level:
throughput (answers/s), p50/p99 latency, errors (anything but a 200 with num_images hits), the
server's RSS before and after, and the mean encoder batch size (from /metrics). The run stops by
itself; the table is printed and bench/results/serve.json written.

Modes: "on" is micro-batching with --max-batch 16 (encoders compiled at batch shapes 1, 2, 4, 8
and 16; a batch runs at the smallest that holds it; by default no wait: a batch is what queued
while the last one ran); "wait2" the same with a 2 ms wait for more (the default before
2026-12-04); "off" is --no-batching (each query one encoder call at batch shape 1, in arrival
order).

    python -m bench.serve                              # the full run (a few minutes)
    python -m bench.serve --clients 1 4 --requests 10  # a smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/serve.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import cpu_snapshot, machine_info, other_load, print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
TEXTS = [f"{c} {t}" for c in ("빨간", "파란", "노란", "초록", "하얀", "검은", "작은", "큰")
         for t in ("사과", "고양이", "자동차", "꽃", "강아지", "바다", "하늘", "의자")]
MODES = {"on": ["--max-batch", "16"], "wait2": ["--max-batch", "16", "--batch-wait-ms", "2"],
         "off": ["--no-batching"]}


def model_config(size: str):
    from koclip.config import attention_heads, tiny_config

    if size == "tiny":
        return tiny_config()
    # "small": a 4-layer, 256-wide BERT and ViT. "base": BERT-base and ViT-B sized (12 layers, 768
    # wide), the size of the published Korean CLIP text towers' smallest members (koclip-base's is
    # RoBERTa-large): there a query's cost is its encoding, as in a real deployment.
    layers, width = {"small": (4, 256), "base": (12, 768)}[size]
    config = tiny_config(max_text_length=32, text_length_buckets=(16, 32))
    for tower in (config.text_config, config.vision_config):
        tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads, tower.intermediate_size = (
            width, layers, attention_heads(width), 4 * width)
    config.projection_dim = 128 if size == "small" else 512
    return config


def build(folder: str, size: str, rows: int) -> tuple[str, str]:
    """(model dir, index root): a random model, and a flat index of `rows` random vectors under its fingerprint."""
    from koclip.checkpoint import load_checkpoint
    from koclip.index import build_index
    from koclip.serve.sample import make_model
    from koclip.store import Row, rows_to_table, write_shard

    model_dir = make_model(os.path.join(folder, "model"), model_config(size))
    ckpt = load_checkpoint(model_dir)
    dim = ckpt.config.projection_dim
    vectors = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [Row(f"item{i}", f"/images/{i}.png", "0" * 64, 8, 8, [f"그림 {i}"], v, v[None]) for i, v in enumerate(vectors)]
    store = os.path.join(folder, "store")
    write_shard(os.path.join(store, "shard-00000.parquet"), rows_to_table(items, ckpt.fingerprint, ckpt.config.to_dict(), dim))
    root = os.path.join(folder, "index")
    build_index(store, root, kind="flat", queries=100)
    return model_dir, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def batch_stats(text: str) -> tuple[float, float]:
    """(sum, count) of koclip_batch_size from /metrics text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(("koclip_batch_size_sum ", "koclip_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("koclip_batch_size_sum", 0.0), values.get("koclip_batch_size_count", 0.0)


async def run_level(url: str, clients: int, requests: int, num_images: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def client(c: int):
            for r in range(requests):
                body = {"text": TEXTS[(c * requests + r) % len(TEXTS)], "indice_name": "bench", "num_images": num_images}
                started = time.perf_counter()
                try:
                    async with http.post("/knn-service", json=body) as answer:
                        hits = await answer.json() if answer.status == 200 else None
                        if hits is None or len(hits) != num_images:
                            errors.append(f"{answer.status}: {(await answer.text())[:100]}")
                except aiohttp.ClientError as e:
                    errors.append(repr(e))
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": clients * requests, "seconds": elapsed,
            "throughput": clients * requests / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": len(errors), "error_examples": errors[:3]}


def run_mode(mode: str, model_dir: str, index: str, args) -> list[dict]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{mode}-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "koclip.serve", "--model", model_dir, "--index", f"bench={index}",
                             "--port", str(port), "--poll-seconds", "0", "--log-level", "warning", *MODES[mode]],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log.name).read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in 300 s")
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        asyncio.run(run_level(url, 2, 5, args.num_images))  # warm the connections and caches, not measured
        rows = []
        for clients in args.clients:
            rss_before = rss_bytes(proc.pid)
            sum_before, count_before = batch_stats(httpx.get(url + "/metrics").text)
            snapshot = cpu_snapshot()
            row = asyncio.run(run_level(url, clients, args.requests, args.num_images))
            row["other_load_cores"] = round(other_load(snapshot, cpu_snapshot()), 2)
            sum_after, count_after = batch_stats(httpx.get(url + "/metrics").text)
            row.update(mode=mode, rss_before_mb=rss_before / 2**20, rss_after_mb=rss_bytes(proc.pid) / 2**20,
                       mean_batch=(sum_after - sum_before) / max(1.0, count_after - count_before))
            rows.append(row)
            print(f"  {mode} {clients:>3} clients: {row['throughput']:.1f}/s p50 {row['p50_ms']:.1f} ms "
                  f"p99 {row['p99_ms']:.1f} ms errors {row['errors']} batch {row['mean_batch']:.1f}", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.unlink(log.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=24, help="queries per client (default: 24)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["on", "off"])
    p.add_argument("--model-size", choices=("tiny", "small", "base"), default="small")
    p.add_argument("--rows", type=int, default=20_000, help="index rows (default: 20000)")
    p.add_argument("--num-images", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model_dir, index = build(folder, args.model_size, args.rows)
        rows = [row for mode in args.modes for row in run_mode(mode, model_dir, index, args)]

    print(f"\nkoclip.serve, {args.model_size} model, flat index of {args.rows} rows, text queries, "
          f"{args.requests} per client ({machine_info()['cpu_model']}, {machine_info()['cores_available']} cores, "
          "shared with other jobs: see other_load)")
    print_table(["mode", "clients", "answers/s", "p50 ms", "p99 ms", "errors", "mean batch", "RSS MB before→after",
                 "other load"],
                [[r["mode"], r["clients"], f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  r["errors"], f"{r['mean_batch']:.1f}", f"{r['rss_before_mb']:.0f}→{r['rss_after_mb']:.0f}",
                  r["other_load_cores"]] for r in rows])
    summary = {}
    by = {(r["mode"], r["clients"]): r for r in rows}
    for mode in args.modes:
        if (mode, 1) in by and (mode, 16) in by:
            summary[f"{mode}_16_vs_1_client"] = round(by[(mode, 16)]["throughput"] / by[(mode, 1)]["throughput"], 2)
    if ("on", 16) in by and ("off", 16) in by:
        summary["on_vs_off_at_16"] = round(by[("on", 16)]["throughput"] / by[("off", 16)]["throughput"], 2)
    if ("on", 16) in by and ("off", 1) in by:
        summary["on_16_vs_off_1_client"] = round(by[("on", 16)]["throughput"] / by[("off", 1)]["throughput"], 2)
    summary["errors"] = sum(r["errors"] for r in rows)
    for mode in args.modes:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if mode_rows:
            summary[f"{mode}_rss_growth_mb"] = round(mode_rows[-1]["rss_after_mb"] - mode_rows[0]["rss_before_mb"], 1)
    print("\n" + "  ".join(f"{k} {v}" for k, v in summary.items()))
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "summary": summary, "levels": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
