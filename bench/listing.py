"""Planning cost of the embedding pipeline's driver: listing a manifest and cutting it into units.

  python -m bench.listing                  # 100k and 1M items (writes bench/results/listing.json)
  python -m bench.listing --sizes 20000    # any sizes

Each size runs `pipelines.embed.plan` in its own process (so peak RSS is that run's alone) over
a JSONL manifest of N items, with a tiny random model (only its fingerprint is read): list the
manifest, cut units of 1000, write the `_units/` files. "base RSS" is the process after imports
and before planning; the driver streams the listing, so peak minus base should not grow with N
as a held list of items would (about 1 KB per item).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.common import machine_info, print_table, write_json


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_manifest(path: str, size: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(size):
            f.write(json.dumps({"id": f"item-{i:08d}", "image": f"gs://bucket/images/{i % 9973:05d}/{i:08d}.jpg",
                                "captions": [f"{i}번째 사진: 한국어 설명문"]}, ensure_ascii=False) + "\n")


def _worker(args) -> dict:
    from pipelines import embed

    opts, _ = embed.parse(["--input", args.manifest, "--output", args.output, "--model", args.model,
                           "--unit-size", str(args.unit_size), "--overwrite"])
    embed._load_model_info(args.model, is_default=False)  # imports jax/flax before "base"
    base = _rss_mb()
    started = time.perf_counter()
    plan = embed.plan(opts)
    return {"items": plan.run_info["items"], "units": len(plan.units), "seconds": time.perf_counter() - started,
            "base_rss_mb": base, "peak_rss_mb": _rss_mb()}


def main(argv=None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated item counts")
    p.add_argument("--unit-size", type=int, default=1000)
    p.add_argument("--out", default="bench/results/listing.json", help="JSON results path")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from bench.pipeline import _quick_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        model = _quick_model(tmp)
        for n in (int(s) for s in args.sizes.split(",")):
            manifest = os.path.join(tmp, f"items-{n}.jsonl")
            _write_manifest(manifest, n)
            cmd = [sys.executable, "-m", "bench.listing", "--worker", "--manifest", manifest, "--model", model,
                   "--output", os.path.join(tmp, f"out-{n}"), "--unit-size", str(args.unit_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench.listing: the {n}-item run failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["manifest_mb"] = os.path.getsize(manifest) / 2**20
            row["planning_rss_mb"] = row["peak_rss_mb"] - row["base_rss_mb"]
            rows.append(row)
    print_table(["items", "units", "manifest MB", "seconds", "items/s", "base RSS MB", "peak RSS MB", "peak - base MB"],
                [[r["items"], r["units"], f"{r['manifest_mb']:.0f}", f"{r['seconds']:.1f}",
                  f"{r['items'] / r['seconds']:.0f}", f"{r['base_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['planning_rss_mb']:.0f}"] for r in rows])
    path = write_json(args.out, {"machine": machine_info(), "unit_size": args.unit_size, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
