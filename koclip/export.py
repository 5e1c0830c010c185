"""Export a checkpoint as a transformers `VisionTextDualEncoderModel` (or `CLIPModel`) folder.

`export_transformers(CKPT, DST)` writes what `transformers.AutoModel.from_pretrained(DST)` and
`AutoProcessor.from_pretrained(DST)` load, so a model trained or fine-tuned here runs in PyTorch:
  config.json               model_type "vision-text-dual-encoder": text_config (bert/roberta),
                            vision_config (clip_vision_model/vit), projection_dim, logit_scale_init_value;
                            or, for a CLIP text tower (clip_text_model), model_type "clip"
                            (CLIPModel: a CLIP vision tower only)
  model.safetensors         every parameter in PyTorch's names and layouts (float32); written
                            with safetensors' numpy API, so exporting needs neither torch nor
                            transformers
  preprocessor_config.json  our image recipe: a CLIPImageProcessor (shortest-edge resize, centre
                            crop) or, for a square resize, a ViTImageProcessor; our mean and std
  tokenizer files           the checkpoint's, with model_max_length set to our max_text_length

The text tower keeps its position numbering. A RoBERTa tower trained with FlaxHybridCLIP's
positions 0..L-1 is, as a network, a BERT (RoBERTa differs from BERT only in numbering positions
from pad_token_id + 1), so it is written as a `bert` text model with the same weights, which
numbers positions 0..L-1 as the checkpoint was trained. A "fixed" logit scale s (clip-italian's
20) is written as the parameter ln(s), which VisionTextDualEncoderModel exponentiates.
"""
from __future__ import annotations

import json
import math

import numpy as np
from flax.traverse_util import flatten_dict

from koclip import fs
from koclip.checkpoint import CONFIG_NAME, TOKENIZER_FILES, Checkpoint, load_checkpoint
from koclip.config import HybridCLIPConfig, TextConfig, VisionConfig
from koclip.errors import CheckpointError, ConfigError, UsageError

HF_WEIGHTS_NAME = "model.safetensors"
HF_PREPROCESSOR_NAME = "preprocessor_config.json"
EXPORTABLE_TEXT_TYPES = ("bert", "roberta", "clip_text_model")
EXPORTABLE_VISION_TYPES = ("clip_vision_model", "vit")
# PIL's filter numbers, as transformers stores `resample` in preprocessor_config.json.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_FILE_NAMES_WRITTEN = (CONFIG_NAME, HF_WEIGHTS_NAME, HF_PREPROCESSOR_NAME) + TOKENIZER_FILES


# ---------------------------------------------------------------- weights


def flax_to_torch(params: dict, clip_model: bool = False) -> dict[str, np.ndarray]:
    """Our parameter tree -> PyTorch state-dict names and layouts (the inverse of
    koclip.checkpoint's import): Dense kernel [in, out] -> weight [out, in]; Conv kernel
    [kh, kw, in, out] -> weight [out, in, kh, kw]; LayerNorm scale -> weight; Embed embedding ->
    weight; every other leaf (biases, class/cls tokens, ViT position embeddings, logit_scale)
    keeps its name. Our tree already nests as VisionTextDualEncoderModel does (text_model.,
    vision_model.vision_model. for CLIP, vision_model. for ViT, the projections at the top);
    a CLIPModel (`clip_model`) holds the CLIP vision transformer one level up, as vision_model."""
    out = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        *stem, leaf = path
        if leaf == "kernel":
            leaf = "weight"
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        if clip_model and stem[:2] == ["vision_model", "vision_model"]:
            stem = stem[1:]
        out[".".join([*stem, leaf])] = np.ascontiguousarray(value)
    return out


# ---------------------------------------------------------------- configs


def exported_text_type(config: HybridCLIPConfig) -> str:
    """The transformers model_type the text tower is written as: its own, except that a RoBERTa
    with FlaxHybridCLIP's positions (text_position_ids "from_zero") is the equivalent BERT."""
    text = config.text_config
    if text.model_type not in EXPORTABLE_TEXT_TYPES:
        raise ConfigError(f"a {text.model_type!r} text tower cannot be exported "
                          f"(exported: {', '.join(EXPORTABLE_TEXT_TYPES)})")
    if text.model_type == "clip_text_model" and config.vision_config.model_type != "clip_vision_model":
        raise ConfigError(f"a clip_text_model text tower is exported as a CLIPModel, which holds a CLIP vision "
                          f"tower only, not {config.vision_config.model_type!r}")
    if text.model_type == "roberta" and config.text_position_ids == "from_zero":
        return "bert"
    return text.model_type


def _shared_text_fields(text: TextConfig) -> dict:
    """The text config fields transformers' BERT, RoBERTa and CLIP text configs name alike."""
    return {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "intermediate_size": text.intermediate_size,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "layer_norm_eps": text.layer_norm_eps,
        "pad_token_id": text.pad_token_id,
    }


def _clip_text_config(text: TextConfig, projection_dim: int) -> dict:
    return {"model_type": "clip_text_model", **_shared_text_fields(text),
            "attention_dropout": text.attention_probs_dropout_prob, "eos_token_id": text.eos_token_id,
            "projection_dim": projection_dim}


def _text_config(text: TextConfig, model_type: str) -> dict:
    return {
        "model_type": model_type,
        "architectures": ["BertModel" if model_type == "bert" else "RobertaModel"],
        **_shared_text_fields(text),
        "hidden_dropout_prob": text.hidden_dropout_prob,
        "attention_probs_dropout_prob": text.attention_probs_dropout_prob,
        "type_vocab_size": text.type_vocab_size,
        "position_embedding_type": "absolute",
    }


def _vision_config(vision: VisionConfig, projection_dim: int) -> dict:
    if vision.model_type not in EXPORTABLE_VISION_TYPES:
        raise ConfigError(f"a {vision.model_type!r} vision tower cannot be exported "
                          f"(exported: {', '.join(EXPORTABLE_VISION_TYPES)})")
    shared = {
        "model_type": vision.model_type,
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "hidden_act": vision.hidden_act,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": vision.num_channels,
        "layer_norm_eps": vision.layer_norm_eps,
    }
    if vision.model_type == "clip_vision_model":
        return {**shared, "architectures": ["CLIPVisionModel"], "attention_dropout": vision.attention_dropout,
                "projection_dim": projection_dim}
    return {**shared, "architectures": ["ViTModel"], "hidden_dropout_prob": vision.hidden_dropout_prob,
            "attention_probs_dropout_prob": vision.attention_dropout, "qkv_bias": vision.qkv_bias,
            "pooler_act": vision.pooler_act, "pooler_output_size": vision.hidden_size}


def logit_scale_parameter(config: HybridCLIPConfig, params: dict) -> float:
    """The value of VisionTextDualEncoderModel's logit_scale parameter (logits use its exp)."""
    if config.logit_scale_mode == "fixed":
        return math.log(config.fixed_logit_scale)
    return float(np.asarray(params["logit_scale"]))


def is_clip_model(config: HybridCLIPConfig) -> bool:
    """Whether the export is a CLIPModel (a CLIP text tower) rather than a VisionTextDualEncoderModel."""
    return exported_text_type(config) == "clip_text_model"


def hf_config(ckpt: Checkpoint) -> dict:
    config = ckpt.config
    text_type = exported_text_type(config)
    vision = _vision_config(config.vision_config, config.projection_dim)
    shared = {
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": logit_scale_parameter(config, ckpt.params),
        "dtype": "float32",
        "koclip_fingerprint": ckpt.fingerprint,
    }
    if text_type == "clip_text_model":
        text = _clip_text_config(config.text_config, config.projection_dim)
        return {"model_type": "clip", "architectures": ["CLIPModel"], "text_config": text,
                "vision_config": {k: v for k, v in vision.items() if k != "architectures"}, **shared}
    exported = {
        "model_type": "vision-text-dual-encoder",
        "architectures": ["VisionTextDualEncoderModel"],
        "text_config": _text_config(config.text_config, text_type),
        "vision_config": vision,
        **shared,
    }
    if text_type != config.text_config.model_type:
        exported["koclip_text_model"] = (f"{config.text_config.model_type} trained with FlaxHybridCLIP's "
                                         "positions 0..L-1, exported as the equivalent bert")
    return exported


def preprocessor_config(config: HybridCLIPConfig) -> dict:
    """The image processor of koclip.processing's recipe for this config: CLIPImageProcessor
    (resize of the shortest side, centre crop to the tower's image size) or, for image_resize_mode
    "square", ViTImageProcessor (a resize to the square, no crop); then rescale by 1/255, mean/std."""
    size = config.image_size
    shared = {
        "processor_class": "CLIPProcessor" if is_clip_model(config) else "VisionTextDualEncoderProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": PIL_RESAMPLE[config.image_resample],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
    }
    if config.image_resize_mode == "square":
        return {"image_processor_type": "ViTImageProcessor", **shared, "size": {"height": size, "width": size}}
    return {"image_processor_type": "CLIPImageProcessor", **shared,
            "size": {"shortest_edge": config.resize_shortest_edge},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}}


# ---------------------------------------------------------------- the folder


def _write_json(path: str, value: dict) -> None:
    fs.write_bytes(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def _copy_tokenizer(ckpt: Checkpoint, dst: str) -> None:
    source = ckpt.tokenizer_dir or ckpt.path
    if source is None:
        raise CheckpointError("this checkpoint has no tokenizer files to export")
    copied = []
    for name in TOKENIZER_FILES:
        path = fs.join(source, name)
        if not fs.exists(path):
            continue
        data = fs.read_bytes(path)
        if name == "tokenizer_config.json":
            tokenizer_config = json.loads(data.decode())
            # transformers truncates at model_max_length; ours truncates at max_text_length.
            tokenizer_config["model_max_length"] = ckpt.config.max_text_length
            data = (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode()
        fs.write_bytes(fs.join(dst, name), data)
        copied.append(name)
    if not copied:
        raise CheckpointError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {source}")


def _check_destination(dst: str, overwrite: bool) -> None:
    if fs.exists(dst) and not fs.is_dir(dst):
        raise UsageError(f"export destination {dst} is a file, not a folder")
    if not overwrite:
        found = [name for name in _FILE_NAMES_WRITTEN if fs.exists(fs.join(dst, name))]
        if found:
            raise UsageError(f"{dst} already holds {', '.join(found)}; pass --overwrite to replace them")


def export_transformers(source: str | Checkpoint, dst: str, overwrite: bool = False) -> str:
    """Write `source` (a checkpoint folder or a loaded Checkpoint) to `dst` as a
    VisionTextDualEncoderModel or CLIPModel folder (module docstring); returns dst."""
    from safetensors.numpy import save

    ckpt = load_checkpoint(source) if isinstance(source, str) else source
    config = hf_config(ckpt)  # refuses a tower transformers cannot express before writing anything
    _check_destination(dst, overwrite)
    tensors = flax_to_torch(ckpt.params, clip_model=is_clip_model(ckpt.config))
    tensors["logit_scale"] = np.asarray(config["logit_scale_init_value"], dtype=np.float32)
    fs.write_bytes(fs.join(dst, HF_WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    _copy_tokenizer(ckpt, dst)
    _write_json(fs.join(dst, HF_PREPROCESSOR_NAME), preprocessor_config(ckpt.config))
    # config.json last: a folder with a config is a complete export.
    _write_json(fs.join(dst, CONFIG_NAME), config)
    return dst
