"""Import of transformers folders: one tower (BERT/RoBERTa, CLIP/ViT vision), a whole
`VisionTextDualEncoderModel` (koclip/koclip-base-pt, Bingsu/vitB32_bert_ko_small_clip) or a whole
`CLIPModel` (Bingsu/clip-vit-base-patch32-ko, and every OpenAI-architecture CLIP).

A dual-encoder folder holds config.json (model_type "vision-text-dual-encoder", with
text_config and vision_config), its weights (see koclip.hf_weights), the tokenizer files and
preprocessor_config.json. Its trained text_projection, visual_projection and logit_scale are
kept; its text tower numbers positions as the text model does (text_position_ids "model").
A CLIPModel folder is the same with model_type "clip": a clip_text_model text tower (see
koclip.modeling.clip_text) and a CLIP vision tower, texts up to the text tower's
max_position_embeddings tokens (77 for OpenAI's), as its tokenizer truncates them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from koclip import fs
from koclip.config import IMAGE_RESAMPLES, HybridCLIPConfig, TextConfig, VisionConfig
from koclip.errors import CheckpointError, ConfigError, NotFoundError
from koclip.hf_weights import read_weights, strip_prefix, torch_to_flax, fit, weights_file
from koclip.params import expected_shapes

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
DUAL_ENCODER_TYPE = "vision-text-dual-encoder"
DUAL_ENCODER_ARCHITECTURE = "VisionTextDualEncoderModel"
CLIP_TYPE = "clip"
CLIP_ARCHITECTURE = "CLIPModel"
# PIL's filter numbers, as transformers stores `resample` in preprocessor_config.json.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_json(path: str) -> dict:
    try:
        value = json.loads(fs.read_bytes(path).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def is_dual_encoder(raw_config: dict) -> bool:
    return (raw_config.get("model_type") == DUAL_ENCODER_TYPE
            or DUAL_ENCODER_ARCHITECTURE in (raw_config.get("architectures") or ()))


def is_clip_model(raw_config: dict) -> bool:
    return (raw_config.get("model_type") == CLIP_TYPE
            or CLIP_ARCHITECTURE in (raw_config.get("architectures") or ()))


def is_transformers_model(raw_config: dict) -> bool:
    """A whole two-tower transformers model: what import_transformers_model reads."""
    return is_dual_encoder(raw_config) or is_clip_model(raw_config)


# ---------------------------------------------------------------- preprocessing


def read_preprocessing(folder: str) -> dict:
    """HybridCLIPConfig image fields from preprocessor_config.json ({} when there is none).

    CLIPImageProcessor (size {"shortest_edge": N}): shortest-edge resize + centre crop;
    ViTImageProcessor (size {"height": H, "width": W}): a square resize, no crop. Each with the
    file's mean, std and resample filter.
    """
    path = fs.join(folder, PREPROCESSOR_NAME)
    if not fs.exists(path):
        return {}
    raw = read_json(path)
    found = {k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw}
    size = raw.get("size")
    is_vit = "ViT" in str(raw.get("image_processor_type", ""))
    if isinstance(size, dict) and "shortest_edge" in size:
        found["image_resize"] = int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size or isinstance(size, int) and is_vit:
        found["image_resize_mode"] = "square"
    elif isinstance(size, int):
        found["image_resize"] = size
    resample = raw.get("resample")
    if resample in PIL_RESAMPLE:
        found["image_resample"] = PIL_RESAMPLE[resample]
    elif isinstance(resample, str) and resample.lower() in IMAGE_RESAMPLES:
        found["image_resample"] = resample.lower()
    return found


# ---------------------------------------------------------------- one tower


# Stand-ins for the other tower when only one tower's parameter shapes are wanted.
_TINY_TEXT = TextConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=8)
_TINY_VISION = VisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                            image_size=8, patch_size=8)


def _read_tower(hf_dir: str, what: str, config_cls, tower: str):
    """(the tower's config, the flat shapes our tree expects for it) from an HF config.json."""
    if not fs.is_dir(hf_dir):
        raise NotFoundError(f"{what} checkpoint directory not found: {hf_dir}")
    try:
        tower_config = config_cls.from_dict(read_json(fs.join(hf_dir, CONFIG_NAME)))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{hf_dir}: {e}") from None
    other = {"text_config": _TINY_TEXT, "vision_config": _TINY_VISION}
    other["text_config" if tower == "text_model" else "vision_config"] = tower_config
    shapes = expected_shapes(HybridCLIPConfig(**other))
    prefix = tower + "/"
    return tower_config, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def import_text_encoder(hf_dir: str) -> tuple[TextConfig, dict]:
    """A transformers BERT/RoBERTa directory (config.json + weights) -> (config, params)."""
    text_config, expected = _read_tower(hf_dir, "text", TextConfig, "text_model")
    tensors, source = read_weights(hf_dir)
    tensors = strip_prefix(tensors, ("bert.", "roberta.", "model."))
    converted = torch_to_flax(tensors, expected, ("embeddings/", "encoder/", "pooler/"))
    # Masked-LM checkpoints ship without the pooler; transformers initialises it too.
    return text_config, fit(converted, expected, source, may_init=("pooler/",))


@dataclass
class ImportedVision:
    config: VisionConfig
    params: dict
    projection: np.ndarray | None  # CLIP's own visual_projection kernel [hidden, proj], if present
    preprocessing: dict  # HybridCLIPConfig image fields found in preprocessor_config.json


def import_vision_encoder(hf_dir: str) -> ImportedVision:
    """A transformers CLIP (full or vision-only) or ViT directory -> our vision tree."""
    vision_config, expected = _read_tower(hf_dir, "vision", VisionConfig, "vision_model")
    tensors, source = read_weights(hf_dir)
    projection = None
    if vision_config.model_type == "clip_vision_model":
        if not any(k.startswith("vision_model.") for k in tensors):
            # transformers 5 saves a bare CLIPVisionModel without the vision_model. prefix.
            tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
        if "vision_model.visual_projection.weight" in tensors:
            tensors["visual_projection.weight"] = tensors.pop("vision_model.visual_projection.weight")
        if "visual_projection.weight" in tensors:
            projection = np.asarray(tensors["visual_projection.weight"], np.float32).T
        converted = torch_to_flax(tensors, expected, ("vision_model/",))
        may_init: tuple[str, ...] = ()
    else:
        tensors = strip_prefix(tensors, ("vit.",))
        converted = torch_to_flax(tensors, expected, ("embeddings/", "encoder/", "layernorm/", "pooler/"))
        may_init = ("pooler/",)  # ViTForImageClassification has no pooler
    params = fit(converted, expected, source, may_init=may_init)
    return ImportedVision(vision_config, params, projection, read_preprocessing(hf_dir))


# ---------------------------------------------------------------- VisionTextDualEncoderModel and CLIPModel


def transformers_model_config(folder: str, raw: dict) -> HybridCLIPConfig:
    """The HybridCLIPConfig of a VisionTextDualEncoderModel or CLIPModel folder."""
    where = fs.join(folder, CONFIG_NAME)
    kind = CLIP_TYPE if is_clip_model(raw) else DUAL_ENCODER_TYPE
    missing = [key for key in ("text_config", "vision_config") if not isinstance(raw.get(key), dict)]
    if missing:
        raise CheckpointError(f"{where}: a {kind} config without {' or '.join(missing)}")
    text, vision = dict(raw["text_config"]), dict(raw["vision_config"])
    extra = {}
    if kind == CLIP_TYPE:
        text["model_type"], vision["model_type"] = "clip_text_model", "clip_vision_model"
    try:
        text_config = TextConfig.from_dict(text)
        if kind == CLIP_TYPE:
            extra["max_text_length"] = text_config.max_position_embeddings
        return HybridCLIPConfig(
            text_config=text_config,
            vision_config=VisionConfig.from_dict(vision),
            projection_dim=int(raw.get("projection_dim", 512)),
            logit_scale_init=float(raw.get("logit_scale_init_value", 2.6592)),
            text_position_ids="model",  # neither model passes position_ids to its text tower
            **extra,
            **read_preprocessing(folder),
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def import_transformers_model(folder: str, raw: dict) -> tuple[HybridCLIPConfig, dict]:
    """A VisionTextDualEncoderModel or CLIPModel folder (its parsed config.json `raw`) -> (config, params)."""
    config = transformers_model_config(folder, raw)
    expected = expected_shapes(config)
    tensors, source = read_weights(folder)
    doubled = any(k.startswith("vision_model.vision_model.") for k in tensors)
    if config.vision_config.model_type == "clip_vision_model" and not doubled:
        # Our tree (FlaxHybridCLIP's) holds a whole CLIPVisionModel under vision_model/, one
        # vision_model. level more than CLIPModel, and than transformers 5's save of a fresh dual
        # encoder; transformers 4 (and a re-save in 5, and koclip export) keep it, as we do.
        tensors = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tensors.items()}
    roots = ("text_model/", "vision_model/", "text_projection/", "visual_projection/", "logit_scale")
    return config, fit(torch_to_flax(tensors, expected, roots), expected, source)


def unsupported_folder(folder: str, raw: dict | None) -> str:
    """One line naming what the folder holds that is none of the formats load_checkpoint reads."""
    expected = ("expected a koclip checkpoint, a FlaxHybridCLIP flax_model.msgpack, "
                "or a VisionTextDualEncoderModel or CLIPModel folder")
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(fs.join(folder, "*"), files_only=False))
    except OSError:  # the listing only decorates the message
        names = []
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"
    if raw is None:
        return f"{folder} has no {CONFIG_NAME} (it holds {shown}); {expected}"
    weights = weights_file(folder)
    return (f"{fs.join(folder, CONFIG_NAME)} has model_type {raw.get('model_type')!r} "
            f"(architectures {raw.get('architectures')}) and no text_config/vision_config; "
            f"the folder holds {shown}{f' (transformers weights {weights})' if weights else ''}; {expected}")
