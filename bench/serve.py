"""Bounded loopback load on `python -m koclip.serve`: N concurrent clients x M text queries each.

For each mode (micro-batching on, batching off) a server subprocess is started on 127.0.0.1 over
a random-init model (`--model-size`) and a flat index of random vectors carrying its
fingerprint; once /readyz says ready, each client count in --clients runs: every client sends
its queries (--requests, or more so that a level has --min-level-requests) as POST /knn-service
one after another on its own keep-alive HTTP/1.1 connection (all clients in one asyncio loop), and
the level ends when all are answered. Every answer is checked: an error is anything but a 200
whose body is a JSON list of num_images hits. Reported per level: throughput (answers/s), p50/p99
latency, errors, the server's RSS before and after, the mean encoder batch size (from /metrics),
and the CPU each side spent per request (the server process from /proc, the load generator's
own). The run stops by itself; the table is printed and bench/results/serve.json written.

The clients and the server share the machine's cores, so the load generator is made cheap:
`--client raw` (the default) speaks HTTP/1.1 over asyncio streams (HttpConnection), about 0.1 ms
of CPU per request here; `--client aiohttp` (the client of the runs before 2026-12-08) spent
about 0.4 ms that the server then lacked.

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
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    own = os.times()
    return own.user + own.system


def batch_stats(text: str) -> tuple[float, float]:
    """(sum, count) of koclip_batch_size from /metrics text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(("koclip_batch_size_sum ", "koclip_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("koclip_batch_size_sum", 0.0), values.get("koclip_batch_size_count", 0.0)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the load generator's client.

    A POST is its request line, Host, Content-Type, Content-Length and the JSON body; the answer
    is read by its status line, headers and Content-Length (or chunked) body, and the body is
    parsed as JSON. It does what an HTTP client library does for these requests at a fraction of
    the CPU: the clients share the 2 cores with the server, and aiohttp spent about 0.4 ms of CPU
    per request that the server then lacked (docs/serve.md)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s"
                          % (path.encode(), self.host.encode(), self.port, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            raise ValueError("an answer without Content-Length or chunked body")
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status), data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None


def check_answer(status: int, data: bytes, num_images: int) -> str | None:
    """None for a right answer (200, a JSON list of num_images hits, each with an id and a
    similarity), else what was wrong."""
    if status != 200:
        return f"{status}: {data[:100]!r}"
    try:
        hits = json.loads(data)
    except ValueError:
        return f"200 but not JSON: {data[:100]!r}"
    if not isinstance(hits, list) or len(hits) != num_images or not all("id" in h and "similarity" in h for h in hits):
        return f"200 but not {num_images} hits: {data[:100]!r}"
    return None


async def run_level(url: str, clients: int, requests: int, num_images: int, client: str = "raw") -> dict:
    """Every one of `clients` concurrent clients sends `requests` queries one after another on its
    own keep-alive connection; client "raw" is HttpConnection, "aiohttp" one aiohttp session."""
    if client == "aiohttp":
        return await run_level_aiohttp(url, clients, requests, num_images)
    parsed = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    errors: list[str] = []

    async def one_client(c: int):
        connection = HttpConnection(parsed.hostname, parsed.port)
        try:
            for r in range(requests):
                body = json.dumps({"text": TEXTS[(c * requests + r) % len(TEXTS)], "indice_name": "bench",
                                   "num_images": num_images}).encode()
                started = time.perf_counter()
                try:
                    error = check_answer(*await connection.post_json("/knn-service", body), num_images)
                except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                    error = repr(e)
                    await connection.close()
                if error is not None:
                    errors.append(error)
                latencies.append(time.perf_counter() - started)
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return level_row(clients, requests, elapsed, latencies, errors)


def level_row(clients: int, requests: int, elapsed: float, latencies: list[float], errors: list[str]) -> dict:
    latencies = sorted(latencies)
    return {"clients": clients, "requests": clients * requests, "seconds": elapsed,
            "throughput": clients * requests / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": len(errors), "error_examples": errors[:3]}


async def run_level_aiohttp(url: str, clients: int, requests: int, num_images: int) -> dict:
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
    return level_row(clients, requests, elapsed, latencies, errors)


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
        asyncio.run(run_level(url, 2, 5, args.num_images, args.client))  # warm the connections and caches, not measured
        rows = []
        for clients in args.clients:
            requests = max(args.requests, -(-args.min_level_requests // clients))
            rss_before = rss_bytes(proc.pid)
            sum_before, count_before = batch_stats(httpx.get(url + "/metrics").text)
            snapshot, server_before, client_before = cpu_snapshot(), cpu_seconds(proc.pid), process_cpu_seconds()
            row = asyncio.run(run_level(url, clients, requests, args.num_images, args.client))
            server_cpu, client_cpu = cpu_seconds(proc.pid) - server_before, process_cpu_seconds() - client_before
            # the server is a child process: "other" load is the server plus anything else running
            row["other_load_cores"] = round(other_load(snapshot, cpu_snapshot()), 2)
            row["rest_load_cores"] = round(max(0.0, row["other_load_cores"] - server_cpu / row["seconds"]), 2)
            sum_after, count_after = batch_stats(httpx.get(url + "/metrics").text)
            row.update(mode=mode, rss_before_mb=rss_before / 2**20, rss_after_mb=rss_bytes(proc.pid) / 2**20,
                       mean_batch=(sum_after - sum_before) / max(1.0, count_after - count_before),
                       server_cpu_ms_per_request=1000 * server_cpu / row["requests"],
                       client_cpu_ms_per_request=1000 * client_cpu / row["requests"])
            rows.append(row)
            print(f"  {mode} {clients:>3} clients: {row['throughput']:.1f}/s p50 {row['p50_ms']:.1f} ms "
                  f"p99 {row['p99_ms']:.1f} ms errors {row['errors']} batch {row['mean_batch']:.1f} "
                  f"CPU ms/request server {row['server_cpu_ms_per_request']:.2f} "
                  f"client {row['client_cpu_ms_per_request']:.2f} rest load {row['rest_load_cores']}", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.unlink(log.name)


def server_versions() -> dict:
    """The versions the service ran with; uvicorn parses HTTP with httptools when it is installed,
    else with h11 (pure Python, slower)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("uvicorn", "starlette", "httptools", "uvloop", "faiss-cpu", "jax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=24, help="queries per client (default: 24)")
    p.add_argument("--min-level-requests", type=int, default=384,
                   help="at least this many queries per level: fewer clients send more each (default: 384, "
                        "16 clients x 24)")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="the load generator's HTTP client: raw (HttpConnection, asyncio streams) or aiohttp "
                        "(default: raw)")
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
          f"{args.requests} per client, at least {args.min_level_requests} per level ({machine_info()['cpu_model']}, "
          f"{machine_info()['cores_available']} cores, "
          "shared: rest load is the cores busy with neither the server nor the clients)")
    print_table(["mode", "clients", "answers/s", "p50 ms", "p99 ms", "errors", "mean batch", "RSS MB before→after",
                 "CPU ms/req server", "client", "rest load"],
                [[r["mode"], r["clients"], f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  r["errors"], f"{r['mean_batch']:.1f}", f"{r['rss_before_mb']:.0f}→{r['rss_after_mb']:.0f}",
                  f"{r['server_cpu_ms_per_request']:.2f}", f"{r['client_cpu_ms_per_request']:.2f}",
                  r["rest_load_cores"]] for r in rows])
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
    write_json(args.out, {"machine": machine_info(**server_versions()), "args": vars(args), "summary": summary,
                          "levels": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
