"""The training ablation on emoji-ko's validation split: three recipes, same steps and batch size.

  python -m jobs.ablation                  # trains what is missing, then prints the table
  python -m jobs.ablation --retrain        # trains all three again

(a) the clip-italian recipe: pretrained parts frozen first, AdaBelief + AGC + warmup-cosine,
    fixed logit scale 20 (preset `demo`, which is also the main job's default model);
(b) AdamW on every parameter from step 0, learned logit scale (preset `demo-adamw`);
(c) the (a) recipe with MiniLM's original English vocabulary instead of the Korean one
    (preset `demo-english-vocab`).
Each run's final validation figures come from its own metrics.jsonl (the evaluation at the last
step); wall time is measured here. Writes a Markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jobs.presets import PRESETS
from koclip.cli import ArgumentParser, run_cli

RUNS = (
    ("a", "demo", "clip-italian recipe: frozen warmup, AdaBelief+AGC+cosine, fixed scale 20"),
    ("b", "demo-adamw", "AdamW on everything from step 0, learned scale"),
    ("c", "demo-english-vocab", "recipe (a) with MiniLM's English vocabulary"),
)


def finished(out: str, total_steps: int) -> dict | None:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    evals = [r for r in map(json.loads, open(path).read().splitlines()) if "eval" in r]
    return evals[-1] if evals and evals[-1]["step"] == total_steps else None


def session_seconds(out: str) -> float | None:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]
    sessions = [r for r in records if "session_seconds" in r]
    return sessions[-1]["session_seconds"] if sessions and sessions[-1]["session_start_step"] == 0 else None


def run(name: str, retrain: bool) -> dict:
    from jobs.train import train

    preset = PRESETS[name]
    cfg = preset.config()
    total = sum(p.steps for p in cfg.phases)
    seconds = None
    if retrain or finished(cfg.out, total) is None:
        start = time.perf_counter()
        train(cfg, preset.build_model(cfg))
        seconds = time.perf_counter() - start
    else:  # trained before: by this job, else by jobs.train in one session (its metrics say how long)
        previous = os.path.join(cfg.out, "ablation_time.json")
        seconds = json.load(open(previous))["seconds"] if os.path.exists(previous) else session_seconds(cfg.out)
    if seconds is not None:
        with open(os.path.join(cfg.out, "ablation_time.json"), "w") as f:
            json.dump({"seconds": seconds}, f)
    last = finished(cfg.out, total)
    return {"preset": name, "out": cfg.out, "steps": total, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer, "train_seconds": seconds, "val": last["eval"]}


def table(rows: list[dict]) -> str:
    lines = ["| run | recipe | steps x batch | train time | val loss | val label-query MRR@10 | "
             "val t2i MRR@10 (all captions) | val t2i R@10 | val zero-shot acc@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows:
        v = row["val"]
        minutes = f"{row['train_seconds'] / 60:.1f} min" if row["train_seconds"] else "n/a"
        lines.append(f"| ({key}) `{row['preset']}` | {dict((k, d) for k, _, d in RUNS)[key]} | "
                     f"{row['steps']} x {row['batch_size']} | {minutes} | {v['loss']:.3f} | {v['t2i_label_mrr@10']:.4f} | "
                     f"{v['t2i_mrr@10']:.4f} | "
                     f"{v['t2i_recall@10']:.4f} | {v['zeroshot_acc@1']:.4f} |")
    random_mrr = rows[0][1]["val"]["t2i_mrr@10_random"]
    lines.append(f"\nRandom-ranking MRR@10 for this split: {random_mrr:.4f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m jobs.ablation", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help="train every run again")
    parser.add_argument("--only", choices=[k for k, _, _ in RUNS], nargs="+", help="runs to include")
    parser.add_argument("--out", default="docs/results/ablation", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)

    def report():
        rows = [(key, run(name, args.retrain)) for key, name, _ in RUNS if not args.only or key in args.only]
        text = table(rows)
        print(text)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({key: row for key, row in rows}, f, indent=2)

    return run_cli("jobs.ablation", report)


if __name__ == "__main__":
    sys.exit(main())
