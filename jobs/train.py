"""Fine-tune a hybrid KoCLIP model on image/caption pairs.

  python -m jobs.train --preset demo                      # emoji-ko, MiniLM + small ViT, ~10 min
  python -m jobs.train --preset clip-italian --init DIR --manifest gs://b/pairs.jsonl --out DIR
  python -m jobs.train --preset demo --out DIR --resume    # continue where DIR stopped
  python -m jobs.train --preset demo --set batch_size=64 --set seed=1

The recipe is config as code (jobs/presets.py): a run is a list of phases, each with the regex of
the parameter names it trains, its learning rate and its warmup; the first phase of the
clip-italian recipe trains only the projections, the second everything. Each phase gets a fresh
optimizer state and its own warmup + cosine schedule, as clip-italian's two runs did.

Outputs in --out: the model checkpoint (config.json, flax_model.msgpack, tokenizer files),
train_state.msgpack (params, optimizer state, step: what --resume needs), metrics.jsonl (loss,
learning rate, pairs/s and the wall time since this process started training, every log_every
steps; the validation figures; at the end the session's wall time), and at the end curves.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import re
import sys
import time

import jax
import numpy as np
import optax
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from jobs.presets import PRESETS, Phase, TrainConfig
from jobs.train_steps import contrastive_loss, make_multi_train_step, make_train_step, same_caption
from koclip import checkpoint, fs
from koclip.cli import ArgumentParser, run_cli
from koclip.errors import UsageError
from koclip.modeling import KoCLIP
from koclip.modeling.parallel import data_mesh, replicate, shard_rows

log = logging.getLogger("jobs.train")

STATE_NAME = "train_state.msgpack"
METRICS_NAME = "metrics.jsonl"


def phase_schedule(cfg: TrainConfig, phase: Phase) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, phase.learning_rate, phase.warmup_steps, max(phase.steps, phase.warmup_steps + 1),
        end_value=phase.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: TrainConfig, phase: Phase) -> optax.GradientTransformation:
    schedule = phase_schedule(cfg, phase)
    if cfg.optimizer == "adabelief":
        return optax.chain(
            optax.adaptive_grad_clip(cfg.agc_clip),
            optax.scale_by_belief(),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=cfg.weight_decay)
    raise UsageError(f"optimizer {cfg.optimizer!r} is not 'adabelief' or 'adamw'")


def trainable_names(params_flat: dict, phase: Phase, fixed_scale: bool) -> list[str]:
    pattern = re.compile(phase.trainable)
    names = [k for k in params_flat if pattern.search(k) and not (fixed_scale and k == "logit_scale")]
    if not names:
        raise UsageError(f"phase regex {phase.trainable!r} matches no parameter")
    return sorted(names)


def phase_at(phases, step: int) -> tuple[int, int]:
    """(phase index, the step at which it starts) for a global step."""
    start = 0
    for i, phase in enumerate(phases):
        if step < start + phase.steps:
            return i, start
        start += phase.steps
    return len(phases) - 1, start - phases[-1].steps


class MetricsLog:
    """metrics.jsonl; on resume, records past the resumed step are dropped."""

    def __init__(self, path: str, keep_until: int | None):
        self.path = path
        self.records = []
        if keep_until is not None and fs.exists(path):
            lines = fs.read_bytes(path).decode().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= keep_until]
        self._flush()

    def add(self, **record):
        self.records.append(record)
        self._flush()

    def _flush(self):
        fs.write_bytes(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records).encode())


def save_state(out: str, config, flat, opt_state, step: int, tokenizer) -> None:
    params = unflatten_dict(jax.device_get(flat), sep="/")
    state = {"step": step, "params": params, "opt_state": serialization.to_state_dict(jax.device_get(opt_state))}
    fs.write_bytes(fs.join(out, STATE_NAME), serialization.msgpack_serialize(state))
    checkpoint.save_checkpoint(out, config, params, tokenizer=tokenizer)


def plot_curves(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss")
    if evals:
        axes[0].plot([m["step"] for m in evals], [m["eval"]["loss"] for m in evals], "o-", label="val loss")
        for key in ("t2i_label_mrr@10", "t2i_mrr@10", "t2i_recall@1", "zeroshot_acc@1"):
            if key in evals[0]["eval"]:
                axes[1].plot([m["step"] for m in evals], [m["eval"][key] for m in evals], "o-", label=key)
    for ax, title in zip(axes, ("contrastive loss", "validation retrieval")):
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    fs.write_bytes(path, buffer.getvalue())
    plt.close(fig)


class Validation:
    """Validation loss (fixed batches, no augmentation) and jobs.evaluate's retrieval metrics."""

    def __init__(self, records, model: KoCLIP, config, tokenizer, cfg: TrainConfig, tokenizer_dir: str):
        from jobs.train_data import PairBatches

        self.records, self.cfg, self.config, self.tokenizer_dir = records, cfg, config, tokenizer_dir
        size = min(cfg.batch_size, len(records))
        self.batches = PairBatches(records, config, tokenizer, size, seed=0, augment_images=False,
                                   cache_images=cfg.cache_images, label_probability=cfg.label_probability)
        self.loss_fn = jax.jit(lambda params, ids, mask, pixels: contrastive_loss(
            model.contrastive_logits(params, ids, mask, pixels)[0], same_caption(ids)))

    def __call__(self, flat) -> dict:
        from jobs.evaluate import evaluate

        params = unflatten_dict(jax.device_get(flat), sep="/")
        losses = [float(self.loss_fn(params, *self.batches.batch(i))) for i in range(self.batches.steps_per_epoch)]
        current = checkpoint.Checkpoint(self.config, params, tokenizer_dir=self.tokenizer_dir)
        metrics = evaluate(current, self.records, batch_size=self.cfg.batch_size, dtype=self.cfg.dtype)["metrics"]
        return {"loss": float(np.mean(losses)), **metrics}


def check_same_run(saved: dict, cfg: TrainConfig) -> None:
    """Exact resume needs the run's own recipe: refuse a resume under a different config."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    differ = sorted(k for k in now if k != "out" and saved.get(k) != now[k])
    if differ:
        raise UsageError(f"cannot resume {cfg.out} with a different config: {', '.join(differ)} changed")


def train(cfg: TrainConfig, source: checkpoint.Checkpoint | None, resume: bool = False,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns the final metrics record."""
    from tqdm.auto import tqdm

    from jobs.train_data import PairBatches
    from koclip.data.manifest import read_manifest

    train_records = read_manifest(cfg.manifest, split=cfg.train_split)
    eval_records = read_manifest(cfg.manifest, split=cfg.eval_split) if cfg.eval_split else []
    start_step, opt_state_dict = 0, None
    if resume:
        ckpt = checkpoint.load_checkpoint(cfg.out)
        state = serialization.msgpack_restore(fs.read_bytes(fs.join(cfg.out, STATE_NAME)))
        start_step, opt_state_dict = int(state["step"]), state["opt_state"]
        ckpt.params = jax.tree_util.tree_map(np.asarray, state["params"])
        log.info("resuming %s at step %d", cfg.out, start_step)
    else:
        if source is None:
            raise UsageError("no model to start from: give --init DIR or a preset that builds one")
        ckpt = source
    config, tokenizer = ckpt.config, ckpt.tokenizer()
    config_path = fs.join(cfg.out, "train_config.json")
    if resume:
        check_same_run(json.loads(fs.read_bytes(config_path)), cfg)
    else:  # --out is a loadable checkpoint (with its tokenizer) from the start
        checkpoint.save_checkpoint(cfg.out, config, ckpt.params, tokenizer=tokenizer)
        fs.write_bytes(config_path, json.dumps(cfg.to_dict(), indent=2).encode())
    model = KoCLIP(config, cfg.dtype)
    mesh = data_mesh()
    if cfg.batch_size % mesh.size:
        raise UsageError(f"batch_size {cfg.batch_size} is not a multiple of the {mesh.size} devices")
    batches = PairBatches(train_records, config, tokenizer, cfg.batch_size, cfg.seed, cfg.augment,
                          cache_images=cfg.cache_images, label_probability=cfg.label_probability,
                          captions_per_image=cfg.captions_per_image, text_rows=cfg.text_rows)
    eval_every = cfg.eval_every or batches.steps_per_epoch
    validate = Validation(eval_records, model, config, tokenizer, cfg, cfg.out) if eval_records else None
    metrics = MetricsLog(fs.join(cfg.out, METRICS_NAME), keep_until=start_step if resume else None)
    flat = replicate(flatten_dict(ckpt.params, sep="/"), mesh)
    total = sum(p.steps for p in cfg.phases)
    end = min(total, stop_at) if stop_at is not None else total
    fixed_scale = config.logit_scale_mode == "fixed"
    key = jax.random.PRNGKey(cfg.seed)

    current_phase, step_fn, opt_state, names = None, None, None, None
    pending = batches.prefetch(start_step) if start_step < end else None
    bar = tqdm(total=end, initial=start_step, disable=not progress, desc="train", unit="step")
    started = last_time = time.perf_counter()
    last_step, loss = start_step, None
    for step in range(start_step, end):
        index, phase_start = phase_at(cfg.phases, step)
        if index != current_phase:
            phase = cfg.phases[index]
            names = trainable_names(flat, phase, fixed_scale)
            optimizer = make_optimizer(cfg, phase)
            step_fn = (make_multi_train_step if batches.multi else make_train_step)(model, optimizer, names)
            opt_state = optimizer.init({k: flat[k] for k in names})
            if opt_state_dict is not None and step == start_step and step != phase_start:
                opt_state = serialization.from_state_dict(opt_state, opt_state_dict)
            opt_state = replicate(opt_state, mesh)
            current_phase = index
            log.info("phase %d from step %d: training %d tensors matching %r", index, step, len(names), phase.trainable)
        arrays = pending.result()
        pending = batches.prefetch(step + 1) if step + 1 < end else None
        rng = jax.random.fold_in(key, step)
        flat, opt_state, loss = step_fn(flat, opt_state, *(shard_rows(x, mesh) for x in arrays), rng)
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == end:
            now = time.perf_counter()
            loss = float(loss)
            lr = float(phase_schedule(cfg, cfg.phases[index])(done - phase_start - 1))
            metrics.add(step=done, phase=index, loss=loss, lr=lr,
                        pairs_per_s=(done - last_step) * cfg.batch_size / (now - last_time),
                        skipped_images=len(batches.failed), elapsed_seconds=round(now - started, 1))
            bar.set_postfix(loss=f"{loss:.3f}", phase=index)
            last_time, last_step = now, done
        if done % cfg.checkpoint_every == 0 or done == end:
            save_state(cfg.out, config, flat, opt_state, done, tokenizer)
        if validate and (done % eval_every == 0 or done == total):
            metrics.add(step=done, epoch=round(done / batches.steps_per_epoch, 3), eval=validate(flat))
    bar.close()
    if batches.failed:
        log.warning("%d training images could not be decoded and were skipped", len(batches.failed))
    if end == total:
        metrics.add(step=end, session_seconds=round(time.perf_counter() - started, 1),  # training + validation
                    session_start_step=start_step)
        plot_curves(metrics.records, fs.join(cfg.out, "curves.png"))
    return {"step": end, "loss": None if loss is None else float(loss), "skipped_images": len(batches.failed)}


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields or name == "phases":
            raise UsageError(f"--set {pair!r}: expected NAME=VALUE with NAME one of "
                             f"{sorted(n for n in fields if n != 'phases')}")
        current = getattr(cfg, name)
        if isinstance(current, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif current is None:
            changes[name] = value
        else:
            try:
                changes[name] = type(current)(value)
            except ValueError:
                raise UsageError(f"--set {pair!r}: {name} takes a {type(current).__name__}") from None
    return dataclasses.replace(cfg, **changes)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m jobs.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="recipe (default: demo)")
    parser.add_argument("--init", help="checkpoint to fine-tune (default: what the preset builds)")
    parser.add_argument("--manifest", help="JSONL manifest with splits (default: the preset's)")
    parser.add_argument("--out", help="output directory, local or gs:// (default: the preset's)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--stop-at", type=int, help="stop after this global step (the run stays resumable)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a TrainConfig field")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    preset = PRESETS[args.preset]

    def run():
        cfg = preset.config()
        cfg = dataclasses.replace(cfg, manifest=args.manifest or cfg.manifest, out=args.out or cfg.out)
        cfg = apply_overrides(cfg, args.set)
        if args.steps_scale != 1.0:
            cfg = cfg.scaled(args.steps_scale)
        source = None
        if not args.resume:
            source = checkpoint.load_checkpoint(args.init) if args.init else preset.build_model(cfg)
        result = train(cfg, source, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
        print(f"trained to step {result['step']} (loss {result['loss']}); model in {cfg.out}")

    return run_cli("jobs.train", run)


if __name__ == "__main__":
    sys.exit(main())
