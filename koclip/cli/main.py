"""`koclip` command line: build, inspect and try out hybrid checkpoints.

  koclip init OUT --tiny tiny-bert-clip            a tiny random model with a small vocabulary
  koclip init OUT --text DIR --vision DIR          a hybrid from two transformers checkpoints
  koclip convert SRC DST                            any loadable folder (FlaxHybridCLIP, transformers'
                                                    VisionTextDualEncoderModel) -> our format
  koclip info DIR                                   config, parameter counts, fingerprint
  koclip embed-text DIR "빨간 사과" "강아지 얼굴"      embeddings, and similarities between texts
  koclip embed-image DIR a.jpg b.png [--text ...]   embeddings, or image-text probabilities
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from koclip.cli import ArgumentParser, run_cli
from koclip.config import NAMED_CONFIGS
from koclip.errors import UsageError

log = logging.getLogger("koclip")


def cmd_init(args) -> None:
    from koclip import checkpoint
    from koclip.modeling import KoCLIP
    from koclip.vocab import TINY_CORPUS, train_wordpiece

    if args.tiny:
        config = NAMED_CONFIGS[args.tiny]()
        if args.logit_scale:
            config.logit_scale_mode = args.logit_scale
        tokenizer = train_wordpiece(TINY_CORPUS, vocab_size=config.text_config.vocab_size)
        params = KoCLIP(config).init(args.seed)
        checkpoint.save_checkpoint(args.out, config, params, tokenizer=tokenizer)
        fp = checkpoint.fingerprint(config, params)
    else:
        if not (args.text and args.vision):
            raise UsageError("init needs --tiny NAME, or both --text DIR and --vision DIR")
        extra = {"logit_scale_mode": args.logit_scale} if args.logit_scale else {}
        built = checkpoint.build_hybrid(args.text, args.vision, projection_dim=args.projection_dim,
                                        reuse_clip_projection=not args.new_projection, seed=args.seed, **extra)
        checkpoint.save_checkpoint(args.out, built.config, built.params, tokenizer_dir=built.tokenizer_dir)
        fp = built.fingerprint
    print(f"wrote {args.out} (fingerprint {fp})")


def cmd_info(args) -> None:
    from koclip import checkpoint
    from koclip.modeling import count_params

    ckpt = checkpoint.load_checkpoint(args.dir)
    cfg = ckpt.config
    t, v = cfg.text_config, cfg.vision_config
    rows = [
        ("text encoder", f"{t.model_type}: {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}"),
        ("vision encoder", f"{v.model_type}: {v.num_hidden_layers} layers, hidden {v.hidden_size}, "
                           f"image {v.image_size}, patch {v.patch_size}"),
        ("projection_dim", str(cfg.projection_dim)),
        ("logit scale", f"fixed {cfg.fixed_logit_scale}" if cfg.logit_scale_mode == "fixed"
         else f"learned, exp({float(ckpt.params['logit_scale']):.4f})"),
        ("text lengths", f"max {cfg.max_text_length}, buckets {list(cfg.text_length_buckets)}"),
        ("text positions", TEXT_POSITIONS_SHOWN[cfg.text_position_ids]),
        ("parameters", f"{count_params(ckpt.params):,} (text {count_params(ckpt.params['text_model']):,}, "
                       f"vision {count_params(ckpt.params['vision_model']):,})"),
        ("fingerprint", ckpt.fingerprint),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


TEXT_POSITIONS_SHOWN = {
    "model": "model (the text model's own: RoBERTa from pad_token_id + 1, BERT from 0)",
    "from_zero": "from_zero (0..L-1, as FlaxHybridCLIP called the text model)",
}


def cmd_convert(args) -> None:
    from koclip import checkpoint

    ckpt = checkpoint.load_checkpoint(args.src)
    checkpoint.save_checkpoint(args.dst, ckpt.config, ckpt.params, tokenizer_dir=args.src)
    print(f"wrote {args.dst} (fingerprint {ckpt.fingerprint})")


def _model(args):
    from koclip import checkpoint

    ckpt = checkpoint.load_checkpoint(args.dir)
    return ckpt, ckpt.model(args.dtype)


def _embed_texts(ckpt, model, texts) -> np.ndarray:
    import jax

    from koclip.processing import tokenize

    if any(not t.strip() for t in texts):
        raise UsageError("a text is empty")
    ids, mask = tokenize(ckpt.encoding_tokenizer(), list(texts), ckpt.config.text_length_buckets, ckpt.config.max_text_length)
    return np.asarray(jax.jit(model.encode_text)(ckpt.params, ids, mask))


def _print_matrix(title: str, rows: list[str], cols: list[str], values: np.ndarray) -> None:
    print(title)
    width = max(len(r) for r in rows)
    print(" " * width + "  " + "  ".join(f"{c[:12]:>12}" for c in cols))
    for name, line in zip(rows, values):
        print(f"{name:<{width}}  " + "  ".join(f"{x:12.4f}" for x in line))


def _print_embeddings(names, embeddings, as_json: bool) -> None:
    if as_json:
        print(json.dumps({n: [round(float(x), 6) for x in e] for n, e in zip(names, embeddings)}, ensure_ascii=False))
        return
    for name, e in zip(names, embeddings):
        head = " ".join(f"{x:+.4f}" for x in e[:6])
        print(f"{name}: [{head} ...] dim {e.shape[0]}, norm {np.linalg.norm(e):.4f}")


def cmd_embed_text(args) -> None:
    ckpt, model = _model(args)
    emb = _embed_texts(ckpt, model, args.texts)
    _print_embeddings(args.texts, emb, args.json)
    if len(args.texts) > 1 and not args.json:
        _print_matrix("cosine similarity", args.texts, args.texts, emb @ emb.T)


def cmd_embed_image(args) -> None:
    import jax

    from koclip.processing import ImagePreprocessor

    ckpt, model = _model(args)
    pixels = ImagePreprocessor.from_config(ckpt.config).batch(args.images)
    emb = np.asarray(jax.jit(model.encode_image)(ckpt.params, pixels))
    if not args.text:
        _print_embeddings(args.images, emb, args.json)
        return
    text_emb = _embed_texts(ckpt, model, args.text)
    logits = float(model.logit_scale(ckpt.params)) * emb @ text_emb.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if args.json:
        print(json.dumps({img: dict(zip(args.text, map(float, p))) for img, p in zip(args.images, probs)},
                         ensure_ascii=False))
    else:
        _print_matrix("probability of each text, per image", args.images, args.text, probs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="koclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="build a hybrid checkpoint")
    p.add_argument("out", help="output directory (local or gs://)")
    p.add_argument("--tiny", choices=sorted(NAMED_CONFIGS), help="a named tiny random-init config")
    p.add_argument("--text", help="transformers BERT/RoBERTa directory (config.json + model.safetensors)")
    p.add_argument("--vision", help="transformers CLIP or ViT directory")
    p.add_argument("--projection-dim", type=int, help="default: CLIP's projection size, else 512")
    p.add_argument("--new-projection", action="store_true", help="do not reuse CLIP's visual projection")
    p.add_argument("--logit-scale", choices=["learned", "fixed"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("convert", help="write any loadable checkpoint folder in our format")
    p.add_argument("src", help="a koclip, FlaxHybridCLIP, or transformers VisionTextDualEncoderModel or CLIPModel folder")
    p.add_argument("dst", help="output directory (local or gs://)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", help="print config, parameter counts and fingerprint")
    p.add_argument("dir")
    p.set_defaults(run=cmd_info)

    def cmd_export(args) -> None:
        from koclip.checkpoint import load_checkpoint
        from koclip.export import export_transformers, is_clip_model

        ckpt = load_checkpoint(args.ckpt)
        export_transformers(ckpt, args.dst, overwrite=args.overwrite)
        architecture = "CLIPModel" if is_clip_model(ckpt.config) else "VisionTextDualEncoderModel"
        print(f"wrote {args.dst} (transformers {architecture}: AutoModel/AutoProcessor.from_pretrained)")

    p = sub.add_parser("export", help="write a transformers VisionTextDualEncoderModel (or, for a CLIP text tower, CLIPModel) folder")
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("dst", help="output folder for transformers' AutoModel/AutoProcessor.from_pretrained")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in DST")
    p.set_defaults(run=cmd_export)

    for name, fn, what in (("embed-text", cmd_embed_text, "texts"), ("embed-image", cmd_embed_image, "images")):
        p = sub.add_parser(name, help=f"embed {what} and print embeddings or similarities")
        p.add_argument("dir", help="checkpoint directory")
        p.add_argument(what, nargs="+", help="image paths or URLs" if what == "images" else "texts")
        if what == "images":
            p.add_argument("--text", nargs="+", help="labels: print image-text probabilities instead")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(run=fn)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_cli("koclip", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
