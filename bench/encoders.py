"""Encoder throughput on CPU: our jitted Flax towers vs transformers' PyTorch models.

One run measures (1) the machine's matmul peak, (2) the image tower (CLIP ViT-B/32), (3) the
text tower (RoBERTa-large at --text-length tokens) and (4) the CLIP text transformer of ViT-B/32
(`cliptext`, at --clip-text-length tokens, CLIP's 77 by default), each in our Flax implementation
(`KoCLIP.encode_image` / `encode_text` under jax.jit) and in transformers' `CLIPVisionModel` /
`RobertaModel` (with pooler) / `CLIPTextModel` under torch.inference_mode(), for each dtype. Weights are random:
speed only depends on the architecture and the shapes. The hybrid model needs both towers, so
the tower being measured is paired with koclip.config.tiny_config's other tower.

Fairness: torch gets torch.set_num_threads(N), N = the cores in this process's CPU affinity;
XLA's CPU client sizes its intra-op (Eigen) pool from the same affinity, and the table header
shows the pool size observed. Compilation (ours) and the first call (torch) are timed apart;
then the two frameworks run alternately, `--repeats` full batches each, and the best time is
reported (the median is in the JSON), so load from other processes hurts both alike.
"% of peak" divides the achieved GFLOP/s (flops_per_item) by the best 2048^2 matmul of the row's
dtype in either framework, measured at the start and at the end of the run. XLA_FLAGS from the
environment apply and are recorded.

bfloat16: both sides convert their weights once, outside the timing (ours with
KoCLIP.cast_params, torch with .to(torch.bfloat16)). XLA:CPU runs a bf16 x bf16 -> bf16 dot by
upcasting to float32 (compare "jax bfloat16" with "jax bfloat16->f32" in the matmul peaks) and
none of the documented XLA:CPU flags (oneDNN/XNNPACK/YNNPACK fusion types, xla_cpu_use_onednn,
xla_allow_excess_precision) changes that, so koclip.modeling's dense layers and attention ask
for float32 results from bf16 operands, which run natively.

`--matmul` chooses the matmul of our dense layers (koclip.modeling.onednn): `auto` (the default,
what users get), `onednn` (oneDNN's matmul through a JAX FFI call; `onednn:P` with
KOCLIP_ONEDNN_PARTS=P), `xla` (XLA's dot), or a comma-separated list to measure several in one
run, each as its own "ours (flax, <matmul>)" row with its own ratio to the same torch row. The path that ran and why is printed and in the JSON.

    python -m bench.encoders                    # full run, a few minutes on 2 cores
    python -m bench.encoders --quick            # tiny configs, seconds (a smoke run)
    python -m bench.encoders --matmul xla,onednn
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/encoders.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch
import transformers

from bench.common import (available_cores, cpu_snapshot, load_average, machine_info, other_load, print_table,
                          summarize, timed, timed_result, write_json)
from koclip.config import CLIP_TEXT_DEFAULTS, HybridCLIPConfig, TextConfig, VisionConfig, tiny_config
from koclip.modeling import KoCLIP, onednn

DTYPES = ("float32", "bfloat16")
TORCH_BF16_USABLE = 0.25  # torch bf16 rows are measured when its bf16 matmul is at least this x its f32
# Field names shared by our configs and transformers' CLIPVisionConfig / RobertaConfig.
VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "image_size", "patch_size", "layer_norm_eps")
TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
CLIP_TEXT_KEYS = tuple(k for k in TEXT_KEYS if k != "type_vocab_size") + ("eos_token_id",)
TOWERS = ("image", "text", "cliptext")
VIT_B32 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               hidden_act="quick_gelu", image_size=224, patch_size=32, layer_norm_eps=1e-5)
ROBERTA_LARGE = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, hidden_act="gelu", max_position_embeddings=514,
                     type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
CLIP_B32_TEXT = {k: CLIP_TEXT_DEFAULTS[k] for k in CLIP_TEXT_KEYS}


def tower_specs(quick: bool) -> dict[str, dict]:
    if not quick:
        return {"image": VIT_B32, "text": ROBERTA_LARGE, "cliptext": CLIP_B32_TEXT}
    tiny = tiny_config("roberta")
    tiny_clip = tiny_config("clip_text_model").text_config
    return {"image": {k: getattr(tiny.vision_config, k) for k in VISION_KEYS},
            "text": {k: getattr(tiny.text_config, k) for k in TEXT_KEYS},
            "cliptext": {k: getattr(tiny_clip, k) for k in CLIP_TEXT_KEYS}}


def text_length(tower: str, spec: dict, args) -> int:
    """Tokens per caption; CLIP's text tower cannot take more than its position table (the tiny one: fewer)."""
    if tower == "cliptext":
        return min(args.clip_text_length, spec["max_position_embeddings"])
    return args.text_length


def tokens_per_item(tower: str, spec: dict, text_length: int) -> int:
    return (spec["image_size"] // spec["patch_size"]) ** 2 + 1 if tower == "image" else text_length


def flops_per_item(tower: str, spec: dict, text_length: int) -> float:
    """Forward FLOPs for one image or caption, counting matmuls only (1 multiply-add = 2 FLOPs).

    With hidden d, intermediate f, L layers and n tokens (image: (S/P)^2 patches + the class
    token; text: the padded length):
        per layer   2*n*(4*d^2 + 2*d*f)      q, k, v, out projections and the two MLP matmuls
                  + 4*n^2*d                  scores q.k^T and probs.v over all heads
        image       + 2*(S/P)^2*(3*P^2)*d    the patch embedding (a stride-P conv)
        text        + 2*d^2                  the pooler dense on the first token (not cliptext:
                                             CLIP pools the end-of-text token's state as it is)
    Layer norms, softmax, activations, embedding lookups and our projection to the shared space
    (2*d*projection_dim, absent from the torch models) are left out: a few % at most.
    """
    d, f, layers = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    n = tokens_per_item(tower, spec, text_length)
    total = layers * (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d)
    if tower == "image":
        total += 2 * (n - 1) * 3 * spec["patch_size"] ** 2 * d
    elif tower == "text":
        total += 2 * d * d
    return float(total)


def matmul_peak(n: int, repeats: int, torch_bf16: bool = True) -> dict[str, float]:
    """GFLOP/s of the best of `repeats` n x n matmuls per framework and dtype.

    "jax bfloat16->f32" asks for a float32 result (preferred_element_type): XLA's CPU backend
    then runs the bf16 inputs natively, while a bf16 x bf16 -> bf16 dot is upcast to float32.
    """
    rng = np.random.default_rng(0)
    a32, b32 = rng.standard_normal((2, n, n), dtype=np.float32)
    matmul = jax.jit(jnp.matmul)
    matmul_f32_out = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    ja, jb = jnp.asarray(a32), jnp.asarray(b32)
    ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    tc, td = ta.bfloat16(), tb.bfloat16()
    cases = {
        "jax float32": lambda: matmul(ja, jb).block_until_ready(),
        "torch float32": lambda: torch.mm(ta, tb),
        "jax bfloat16": lambda: matmul(ha, hb).block_until_ready(),
        "jax bfloat16->f32": lambda: matmul_f32_out(ha, hb).block_until_ready(),
        "torch bfloat16": lambda: torch.mm(tc, td),
    }
    if not torch_bf16:
        del cases["torch bfloat16"]
    for run in cases.values():
        run()  # compile / warm up
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):  # interleaved, like the towers
        for name, run in cases.items():
            best[name] = min(best[name], timed(run))
    return {name: 2 * n ** 3 / s / 1e9 for name, s in best.items()}


def torch_bf16_probe(n: int = 512, repeats: int = 3) -> dict:
    """torch's bfloat16 and float32 matmul GFLOP/s at n x n. On a CPU without AVX-512 BF16 or AMX
    (an AVX2-only EPYC, for one) torch's bf16 matmul takes a scalar path some 30x slower than its
    float32: a bf16 tower row would then take hours and measure nothing of interest."""
    a = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = a.bfloat16()
    f32 = min(timed(lambda: torch.mm(a, a)) for _ in range(repeats))
    bf16 = min(timed(lambda: torch.mm(b, b)) for _ in range(repeats))
    gflops = {"float32": 2 * n ** 3 / f32 / 1e9, "bfloat16": 2 * n ** 3 / bf16 / 1e9, "n": n}
    return {**gflops, "usable": gflops["bfloat16"] >= TORCH_BF16_USABLE * gflops["float32"]}


def xla_threads() -> int | None:
    """Threads of XLA's CPU intra-op pool in this process (named tf_XLAEigen*), once it exists."""
    try:
        names = [Path(f"/proc/self/task/{t}/comm").read_text() for t in os.listdir("/proc/self/task")]
    except OSError:
        return None
    return sum(name.startswith("tf_XLAEigen") for name in names) or None


def make_inputs(tower: str, spec: dict, batch: int, text_length: int, seed: int = 0):
    """(jax inputs, torch inputs) holding the same values; pixels NHWC for us, NCHW for torch."""
    rng = np.random.default_rng(seed)
    if tower == "image":
        size = spec["image_size"]
        pixels = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
        return (jnp.asarray(pixels),), {"pixel_values": torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())}
    ids = rng.integers(3, spec["vocab_size"], (batch, text_length), dtype=np.int32)
    if tower == "cliptext":  # the end-of-text token ends every caption; its state is the pooled output
        ids[ids == spec["eos_token_id"]] = 3
        ids[:, -1] = spec["eos_token_id"]
    mask = np.ones_like(ids)
    return ((jnp.asarray(ids), jnp.asarray(mask)),
            {"input_ids": torch.from_numpy(ids).long(), "attention_mask": torch.from_numpy(mask).long()})


def ours(tower: str, spec: dict, text_length: int):
    """A function of dtype -> (encode function, params in that dtype) for the measured tower."""
    tiny = tiny_config("roberta")
    text = {"text": lambda: TextConfig(model_type="roberta", **spec),
            "cliptext": lambda: TextConfig(model_type="clip_text_model", **spec)}.get(tower, lambda: tiny.text_config)()
    vision = VisionConfig(model_type="clip_vision_model", **spec) if tower == "image" else tiny.vision_config
    config = HybridCLIPConfig(text_config=text, vision_config=vision, max_text_length=text_length,
                              text_length_buckets=(text_length,))
    params = KoCLIP(config, "float32").init(0)

    def encode(dtype: str, matmul: str = "auto"):
        """(encode function, params already in the compute dtype)."""
        model = KoCLIP(config, dtype, matmul)
        return (model.encode_image if tower == "image" else model.encode_text), model.cast_params(params)

    return encode


def torch_model(tower: str, spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if tower == "image":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**spec)).eval()
    if tower == "cliptext":
        config = transformers.CLIPTextConfig(**spec, bos_token_id=spec["eos_token_id"] - 1)
        return transformers.CLIPTextModel(config).eval()
    return transformers.RobertaModel(transformers.RobertaConfig(**spec), add_pooling_layer=True).eval()


def bench_tower(tower: str, spec: dict, args, torch_bf16: bool = True) -> list[dict]:
    length = text_length(tower, spec, args)
    jax_inputs, torch_inputs = make_inputs(tower, spec, args.batch_size, length)
    encode = ours(tower, spec, length)
    model = torch_model(tower, spec)
    flops = flops_per_item(tower, spec, length)
    rows = []
    for dtype in sorted(args.dtypes, key=lambda d: d != "float32"):  # float32 first: torch converts in place
        runners, compile_times = {}, {}
        for matmul in args.matmul:
            setting, _, parts = matmul.partition(":")
            fn, params = encode(dtype, setting)
            with onednn_parts(parts):  # read when the function is traced
                compiled, compile_s = timed_result(lambda: jax.jit(fn).lower(params, *jax_inputs).compile())
            name = ours_name(matmul, args)
            runners[name] = lambda compiled=compiled, params=params: compiled(params, *jax_inputs).block_until_ready()
            compile_times[name] = compile_s
        model.to(getattr(torch, dtype))
        inputs = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in torch_inputs.items()}

        def run_torch():
            with torch.inference_mode():
                return model(**inputs).pooler_output

        if dtype == "float32" or torch_bf16:
            runners["transformers (torch)"] = run_torch
        warmup = {name: timed(run) for name, run in runners.items()}
        times = {name: [] for name in runners}
        start = cpu_snapshot()
        for _ in range(args.repeats):  # alternate, so background load hits both frameworks alike
            for name, run in runners.items():
                times[name].append(timed(run))
        others = other_load(start, cpu_snapshot())
        first = len(rows)
        for name in runners:
            stats = summarize(times[name])
            items_per_s = args.batch_size / stats["best_s"]
            rows.append({
                "tower": tower, "framework": name, "dtype": dtype, "batch_size": args.batch_size,
                "tokens_per_item": tokens_per_item(tower, spec, length),
                "items_per_s": items_per_s, "ms_per_batch": 1e3 * stats["best_s"],
                "median_items_per_s": args.batch_size / stats["median_s"],
                "gflop_per_item": flops / 1e9, "gflop_per_s": flops * items_per_s / 1e9,
                "compile_s": compile_times.get(name),
                "matmul": matmul_of(name, args),
                "first_call_s": warmup[name], "other_processes_cores": others, **stats,
            })
        if "transformers (torch)" in runners:
            for row in rows[first:-1]:
                row["ratio_ours_over_torch"] = row["items_per_s"] / rows[-1]["items_per_s"]
    return rows


@contextlib.contextmanager
def onednn_parts(parts: str):
    """KOCLIP_ONEDNN_PARTS=parts (koclip.modeling.onednn.parts) while tracing, when given."""
    old = os.environ.get("KOCLIP_ONEDNN_PARTS")
    if parts:
        os.environ["KOCLIP_ONEDNN_PARTS"] = parts
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KOCLIP_ONEDNN_PARTS", None)
        else:
            os.environ["KOCLIP_ONEDNN_PARTS"] = old


def ours_name(matmul: str, args) -> str:
    return "ours (flax)" if len(args.matmul) == 1 else f"ours (flax, {matmul})"


def matmul_of(name: str, args) -> str | None:
    """The matmul path a row of ours ran (resolved: "onednn" or "xla"), None for torch."""
    for matmul in args.matmul:
        if name == ours_name(matmul, args):
            return onednn.status(matmul.partition(":")[0])["matmul"]
    return None


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/encoders.json", help="JSON results path (dirs created)")
    p.add_argument("--batch-size", type=int, default=None, help="items per batch (default 32; --quick: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed batches per row (default 5; --quick: 1)")
    p.add_argument("--text-length", type=int, default=32, help="tokens per caption (default 32)")
    p.add_argument("--clip-text-length", type=int, default=77, help="tokens per caption for cliptext (default 77)")
    p.add_argument("--only", choices=TOWERS, help="measure one tower only")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of float32,bfloat16")
    p.add_argument("--quick", action="store_true", help="tiny configs, one repeat: a smoke run in seconds")
    p.add_argument("--matmul", default="auto",
                   help="our dense layers' matmul: auto, onednn or xla, or a comma-separated list (default auto); "
                        "onednn:P traces with KOCLIP_ONEDNN_PARTS=P")
    args = p.parse_args(argv)
    args.matmul = list(dict.fromkeys(m.strip().lower() for m in args.matmul.split(",") if m.strip()))
    if not args.matmul or {m.partition(":")[0] for m in args.matmul} - set(onednn.BACKENDS) or any(
            p and not p.lstrip("-").isdigit() for p in (m.partition(":")[2] for m in args.matmul)):
        p.error(f"--matmul must be a comma-separated subset of {','.join(onednn.BACKENDS)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes must be a comma-separated subset of {','.join(DTYPES)}")
    args.batch_size = args.batch_size or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_at_start, cores = load_average(), available_cores()
    torch.set_num_threads(cores)
    peak_n, peak_repeats = (256, 3) if args.quick else (2048, 10)
    probe = torch_bf16_probe()
    if "bfloat16" in args.dtypes and not probe["usable"]:
        print(f"torch bfloat16 matmul {probe['bfloat16']:.1f} GFLOP/s vs float32 {probe['float32']:.1f} "
              f"({probe['n']}^2): no native bf16 on this CPU; torch's bf16 rows are not measured")
    peak_runs = matmul_peak(peak_n, peak_repeats, probe["usable"])
    threads = {"torch_intra_op": torch.get_num_threads(), "xla_intra_op_observed": xla_threads(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
    matmul_paths = {m: onednn.status(m.partition(":")[0]) for m in args.matmul}
    for m, st in matmul_paths.items():
        print(f"--matmul {m}: our dense layers run {st['matmul']} ({st['reason']}"
              + (f"; oneDNN {st['onednn_version']}" if st.get("onednn_version") else "") + ")")
    print(f"{cores} cores available; torch threads {threads['torch_intra_op']}; XLA CPU pool "
          f"{threads['xla_intra_op_observed']} threads (sized from the CPU affinity); "
          f"XLA_FLAGS={threads['xla_flags']!r}; load average {load_at_start}")
    specs = tower_specs(args.quick)
    rows = []
    for tower in [args.only] if args.only else TOWERS:
        rows += bench_tower(tower, specs[tower], args, probe["usable"])
    # The peak again at the end, keeping the better figure: the peak is what the machine can do.
    peak_runs = {k: max(v, w) for (k, v), w in zip(peak_runs.items(), matmul_peak(peak_n, peak_repeats, probe["usable"]).values())}
    peaks = {d: max(v for k, v in peak_runs.items() if k.split()[1].startswith(d)) for d in DTYPES}
    for r in rows:
        r["pct_of_matmul_peak"] = 100 * r["gflop_per_s"] / peaks[r["dtype"]]
    print(f"matmul peak GFLOP/s ({peak_n}^2, best of start and end): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peak_runs.items()))

    print(f"\nbatch {args.batch_size}, best of {args.repeats}; % peak = of the matmul peak for the row's dtype; "
          "compile s = jit compile (ours) or first call (torch);\nbusy = cores used by other processes "
          "while timing (0 when idle)")
    print_table(
        ["tower", "framework", "dtype", "items/s", "ms/batch", "% peak", "compile s", "ours/torch", "busy"],
        [(r["tower"], r["framework"], r["dtype"], f"{r['items_per_s']:.2f}", f"{r['ms_per_batch']:.0f}",
          f"{r['pct_of_matmul_peak']:.0f}", f"{r['compile_s'] or r['first_call_s']:.1f}",
          f"{r['ratio_ours_over_torch']:.2f}" if "ratio_ours_over_torch" in r else "",
          f"{r['other_processes_cores']:.1f}") for r in rows])
    result = {
        "machine": machine_info(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
                                torch=torch.__version__, transformers=transformers.__version__),
        "load_average_at_start": load_at_start,
        "threads": threads,
        "matmul_paths": matmul_paths,
        "settings": vars(args),
        "configs": specs,
        "matmul_peak_gflops": {"n": peak_n, "runs": peak_runs, "by_dtype": peaks},
        "torch_bf16_probe": probe,
        "rows": rows,
    }
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
