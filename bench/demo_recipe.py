"""Demo recipes side by side: the demo model in other shapes and step counts, trained on emoji-ko,
each scored on the validation split (label-query MRR@10, the figure issue 15 asks of the test
split) and by the query report's top-5 over every image, with its wall time.

A variant is a JSON object: the keys of jobs.presets.DemoArchitecture (image_size, patch_size,
vit_layers, vit_width, text_layers, word_embedding_std), "steps" and "learning_rates" as
[phase 1, phase 2] (phase 1 trains the new parts, phase 2 everything, as the demo preset) and any
TrainConfig field (batch_size, label_probability,
agc_clip, ...). The demo preset itself is `{}`. Choose recipes on validation; report test with
jobs.evaluate on the one chosen.

    python -m bench.demo_recipe '{}' '{"patch_size": 16, "steps": [150, 150]}'
    python -m bench.demo_recipe --smoke '{"patch_size": 16}'    # 2 + 2 steps: does it run
    python -m bench.demo_recipe --append '{"captions_per_image": 0, "text_rows": 256, "batch_size": 32}'

Each run trains into a temporary folder (or --keep DIR/NAME) and writes bench/results/demo_recipe.json.
Training is CPU-bound: run it on an otherwise idle machine, one variant at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/demo_recipe.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, machine_info, print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "demo_recipe.json"


def recipe(variant: dict, out: str, smoke: bool):
    """(TrainConfig, Checkpoint) of a variant of the demo preset."""
    from jobs.presets import DemoArchitecture, PRESETS, demo_model

    arch_fields = {f.name for f in dataclasses.fields(DemoArchitecture)}
    variant = dict(variant)
    arch = DemoArchitecture(**{k: variant.pop(k) for k in list(variant) if k in arch_fields})
    cfg = PRESETS["demo"].config()
    steps = variant.pop("steps", [p.steps for p in cfg.phases])
    if smoke:
        steps = [2, 2]
    rates = variant.pop("learning_rates", [p.learning_rate for p in cfg.phases])
    if len(steps) != len(cfg.phases) or len(rates) != len(cfg.phases):
        raise SystemExit(f"steps, learning_rates: one per phase ({len(cfg.phases)}), got {steps}, {rates}")
    phases = tuple(dataclasses.replace(p, steps=n, learning_rate=lr, warmup_steps=min(p.warmup_steps, n // 4))
                   for p, n, lr in zip(cfg.phases, steps, rates))
    cfg = dataclasses.replace(cfg, out=out, phases=phases, eval_every=10**9, **variant)
    return cfg, demo_model(seed=cfg.seed, arch=arch)


def run(variant: dict, out: str, smoke: bool) -> dict:
    from jobs.query_report import default_queries_path, query_report, read_queries
    from jobs.train import train
    from koclip.checkpoint import load_checkpoint
    from koclip.data.manifest import read_manifest

    cfg, model = recipe(variant, out, smoke)
    started = time.perf_counter()
    train(cfg, model, progress=False)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "eval" in r][-1]["eval"]
    report = query_report(load_checkpoint(out), read_manifest(cfg.manifest), read_queries(default_queries_path()),
                          batch_size=cfg.batch_size)["summary"]
    return {"variant": variant, "steps": [p.steps for p in cfg.phases], "batch_size": cfg.batch_size,
            "train_seconds": round(seconds, 1), "load_average": load_average(),
            "val_label_mrr@10": val["t2i_label_mrr@10"], "val_t2i_mrr@10": val["t2i_mrr@10"],
            "val_loss": val["loss"], "train_loss": next(r["loss"] for r in reversed(records) if "loss" in r),
            "query_top5": report["top5_hit_rate"], "query_top1": report["top1_hit_rate"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="JSON objects (module docstring)")
    p.add_argument("--smoke", action="store_true", help="2 + 2 steps of each variant")
    p.add_argument("--keep", help="train into KEEP/<n> instead of a temporary folder")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true", help="keep the runs already in --out (each with its machine)")
    args = p.parse_args(argv)
    variants = [json.loads(v) for v in args.variants]

    info = machine_info()
    previous = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        previous = [r if "machine" in r else {**r, "machine": old.get("machine"), "smoke": old.get("smoke")}
                    for r in old.get("runs", [])]
    rows = []
    for n, variant in enumerate(variants):
        with tempfile.TemporaryDirectory(prefix="demo-recipe-") as folder:
            out = os.path.join(args.keep, str(n)) if args.keep else folder
            row = run(variant, out, args.smoke)
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        # written after every variant, so a long invocation cut short keeps what it measured
        write_json(args.out, {"machine": info, "smoke": args.smoke,
                              "runs": previous + [{**r, "machine": info, "smoke": args.smoke} for r in rows]})
    print(f"\ndemo recipes on emoji-ko ({info['cpu_model']}, {info['cores_available']} cores)")
    print_table(["variant", "steps", "train s", "val label MRR@10", "val MRR@10", "query top-5", "train loss",
                 "val loss"],
                [[json.dumps(r["variant"]), "+".join(map(str, r["steps"])), f"{r['train_seconds']:.0f}",
                  f"{r['val_label_mrr@10']:.4f}", f"{r['val_t2i_mrr@10']:.4f}", f"{r['query_top5']:.0%}",
                  f"{r['train_loss']:.3f}", f"{r['val_loss']:.3f}"] for r in rows])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
