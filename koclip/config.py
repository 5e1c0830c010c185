"""Configuration of the hybrid model: a text encoder, a vision encoder and two projections.

`HybridCLIPConfig.from_dict` reads the `config.json` of the FlaxHybridCLIP checkpoints that
KoCLIP and clip-italian published (`text_config`/`vision_config`, or the older
`text_config_dict`/`vision_config_dict`), as well as our own; `to_dict` writes a file in the same
layout, with our extra fields beside the published ones.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from koclip.errors import ConfigError

TEXT_MODEL_TYPES = ("bert", "roberta", "clip_text_model")
VISION_MODEL_TYPES = ("clip_vision_model", "vit")
LOGIT_SCALE_MODES = ("learned", "fixed")
TEXT_POSITION_IDS = ("model", "from_zero")
IMAGE_RESIZE_MODES = ("shortest_edge", "square")
IMAGE_RESAMPLES = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")

# Fields our own config.json always carried, and FlaxHybridCLIP's never did: a config without
# text_position_ids but with one of these was written by koclip before that field existed.
_KOCLIP_FIELDS = ("logit_scale_mode", "text_length_buckets", "max_text_length", "fixed_logit_scale")

# Fields added after checkpoints and stores were fingerprinted. At these values they change
# nothing, so they are left out of the fingerprint and existing stores keep theirs.
FINGERPRINT_NEUTRAL = {"text_position_ids": "model", "image_resize_mode": "shortest_edge",
                       "image_resample": "bicubic"}
FINGERPRINT_NEUTRAL_TEXT = {"eos_token_id": None}  # the same, inside text_config

# CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


CLIP_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                      "intermediate_size": 2048, "hidden_act": "quick_gelu", "max_position_embeddings": 77,
                      "layer_norm_eps": 1e-5, "pad_token_id": 1, "eos_token_id": 49407}


def attention_heads(width: int) -> int:
    """BERT's and ViT's convention for a tower of hidden size `width`: 64-wide heads (at least one)."""
    return max(1, width // 64)


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class TextConfig:
    """A BERT, RoBERTa or CLIP text encoder, with the field names of transformers' configs.

    `eos_token_id` is read by the CLIP text tower only (the token it pools at); BERT and RoBERTa
    pool at the first token and keep it unset.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"text model_type {self.model_type!r} is not supported; expected one of {TEXT_MODEL_TYPES}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("text hidden_size must be a multiple of num_attention_heads")
        if self.model_type == "clip_text_model" and not isinstance(self.eos_token_id, int):
            raise ConfigError(f"a clip_text_model needs one integer eos_token_id (the token it pools at), "
                              f"got {self.eos_token_id!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        d = dict(d)
        if d.get("model_type") == "roberta" and "pad_token_id" not in d:
            d["pad_token_id"] = 1
        if d.get("model_type") == "clip_text_model":
            # transformers' CLIPTextConfig defaults, for configs that leave a field out.
            for key, value in CLIP_TEXT_DEFAULTS.items():
                d.setdefault(key, value)
            d.setdefault("attention_probs_dropout_prob", d.get("attention_dropout", 0.0))
            d.setdefault("hidden_dropout_prob", 0.0)
        return cls(**_known_fields(cls, d))

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_text_length(self) -> int:
        return self.max_position_embeddings - self.position_offset


@dataclass
class VisionConfig:
    """A CLIP vision tower or a ViT, with the field names of transformers' configs."""

    model_type: str = "clip_vision_model"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    pooler_act: str = "tanh"

    def __post_init__(self):
        if self.model_type not in VISION_MODEL_TYPES:
            raise ConfigError(
                f"vision model_type {self.model_type!r} is not supported; expected one of {VISION_MODEL_TYPES}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError("vision image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        d = dict(d)
        if d.get("model_type") == "clip":
            # A full CLIP config (as FlaxHybridCLIP stored it): the tower is its vision_config.
            d = dict(d.get("vision_config") or d.get("vision_config_dict") or {})
            d["model_type"] = "clip_vision_model"
        if d.get("model_type") == "vit":
            d.setdefault("hidden_act", "gelu")
            d.setdefault("layer_norm_eps", 1e-12)
            d.setdefault("hidden_dropout_prob", 0.0)
            d.setdefault("attention_dropout", d.get("attention_probs_dropout_prob", 0.0))
            d.setdefault("patch_size", 16)
        return cls(**_known_fields(cls, d))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class HybridCLIPConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    # "learned": logits = exp(logit_scale) * cos, logit_scale a parameter (KoCLIP, HF hybrid_clip).
    # "fixed": logits = fixed_logit_scale * cos (clip-italian used 20); the parameter is kept
    # in the tree so published checkpoints load unchanged, but it is not used.
    logit_scale_mode: str = "learned"
    logit_scale_init: float = 2.6592  # ln(1/0.07), as CLIP and VisionTextDualEncoder
    fixed_logit_scale: float = 20.0
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Images are resized so their shortest side is `image_resize`, then center-cropped to the
    # vision tower's image_size (CLIPImageProcessor's recipe); None means image_size.
    # image_resize_mode "square" instead resizes straight to image_size x image_size, no crop
    # (ViTImageProcessor's recipe). image_resample is the PIL filter of the resize.
    image_resize: int | None = None
    image_resize_mode: str = "shortest_edge"
    image_resample: str = "bicubic"
    # How the text tower numbers token positions. "model": the text model's own, as transformers'
    # BertModel / RobertaModel (BERT from 0, RoBERTa from pad_token_id + 1). "from_zero": 0..L-1
    # whatever the model, as FlaxHybridCLIP passed them, so KoCLIP's RoBERTa towers were trained
    # that way. The two differ only for RoBERTa. A config.json without this field: "from_zero"
    # when it is a FlaxHybridCLIP one, "model" when koclip wrote it (what koclip always did).
    text_position_ids: str = "model"
    max_text_length: int = 64
    # Texts are padded to the smallest bucket that fits the longest text of a batch, so jitted
    # functions see at most len(text_length_buckets) text shapes.
    text_length_buckets: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if self.logit_scale_mode not in LOGIT_SCALE_MODES:
            raise ConfigError(
                f"logit_scale_mode {self.logit_scale_mode!r} is not one of {LOGIT_SCALE_MODES}"
            )
        for name, allowed in (("text_position_ids", TEXT_POSITION_IDS), ("image_resize_mode", IMAGE_RESIZE_MODES),
                              ("image_resample", IMAGE_RESAMPLES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        limit = (self.text_config.max_position_embeddings if self.text_position_ids == "from_zero"
                 else self.text_config.max_text_length)
        self.max_text_length = min(int(self.max_text_length), limit)
        buckets = sorted({min(int(b), self.max_text_length) for b in self.text_length_buckets})
        if not buckets or buckets[-1] != self.max_text_length:
            buckets.append(self.max_text_length)
        self.text_length_buckets = tuple(buckets)

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def resize_shortest_edge(self) -> int:
        return self.image_resize or self.vision_config.image_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridCLIPConfig":
        text = d.get("text_config") or d.get("text_config_dict")
        vision = d.get("vision_config") or d.get("vision_config_dict")
        missing = [name for name, v in (("text_config", text), ("vision_config", vision)) if not v]
        if missing:
            raise ConfigError(f"config has no {' or '.join(missing)} (nor the *_config_dict spelling)")
        rest = _known_fields(cls, d)
        rest.pop("text_config", None)
        rest.pop("vision_config", None)
        for key in ("image_mean", "image_std", "text_length_buckets"):
            if key in rest:
                rest[key] = tuple(rest[key])
        if "text_position_ids" not in rest:
            written_by_koclip = any(key in d for key in _KOCLIP_FIELDS)
            rest["text_position_ids"] = "model" if written_by_koclip else "from_zero"
        return cls(text_config=TextConfig.from_dict(text), vision_config=VisionConfig.from_dict(vision), **rest)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "hybrid-clip"
        return d

    def fingerprint_dict(self) -> dict[str, Any]:
        """to_dict() without the FINGERPRINT_NEUTRAL(_TEXT) fields that hold their neutral value."""
        d = self.to_dict()
        for key, neutral in FINGERPRINT_NEUTRAL.items():
            if d.get(key) == neutral:
                del d[key]
        for key, neutral in FINGERPRINT_NEUTRAL_TEXT.items():
            if d["text_config"].get(key) == neutral:
                del d["text_config"][key]
        return d

    @classmethod
    def from_json(cls, text: str) -> "HybridCLIPConfig":
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)


# Named tiny configs, for tests and demos: random init in seconds.
def tiny_config(text: str = "bert", vision: str = "clip_vision_model", **overrides) -> HybridCLIPConfig:
    clip_text = text == "clip_text_model"
    text_config = TextConfig(
        model_type=text, vocab_size=1000, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=66 if text == "roberta" else 64,
        pad_token_id=1 if text == "roberta" else 0,
        # koclip.vocab's tiny tokenizers end a text with [SEP] (id 3): the CLIP tower pools there.
        eos_token_id=3 if clip_text else None,
        hidden_act="quick_gelu" if clip_text else "gelu", layer_norm_eps=1e-5 if clip_text else 1e-12,
    )
    vision_config = VisionConfig(
        model_type=vision, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, image_size=32, patch_size=8,
        hidden_act="quick_gelu" if vision == "clip_vision_model" else "gelu",
        layer_norm_eps=1e-5 if vision == "clip_vision_model" else 1e-12,
    )
    kwargs = dict(text_config=text_config, vision_config=vision_config, projection_dim=16,
                  max_text_length=32, text_length_buckets=(8, 16, 32))
    kwargs.update(overrides)
    return HybridCLIPConfig(**kwargs)


NAMED_CONFIGS = {
    "tiny-bert-clip": lambda: tiny_config("bert", "clip_vision_model"),
    "tiny-roberta-clip": lambda: tiny_config("roberta", "clip_vision_model"),
    "tiny-bert-vit": lambda: tiny_config("bert", "vit"),
    "tiny-roberta-vit": lambda: tiny_config("roberta", "vit"),
    "tiny-cliptext-clip": lambda: tiny_config("clip_text_model", "clip_vision_model"),
}
