"""Checkpoints: our own format, loading of the other formats, and the model fingerprint.

A checkpoint is a directory (local or any fsspec URL, e.g. gs://) holding
  config.json          HybridCLIPConfig (FlaxHybridCLIP's layout plus our fields)
  flax_model.msgpack   the parameter tree, flax msgpack, FlaxHybridCLIP's names
  tokenizer files      whatever `PreTrainedTokenizer.save_pretrained` writes
The checkpoints that KoCLIP and clip-italian published have the same two model files, so they
load as they are (their RoBERTa towers with FlaxHybridCLIP's 0..L-1 positions, see
HybridCLIPConfig.text_position_ids). transformers' VisionTextDualEncoderModel and CLIPModel
folders load too (koclip.hf_import); `koclip convert` writes them in our format.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import jax
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

from koclip import fs
from koclip.config import HybridCLIPConfig
from koclip.errors import CheckpointError, ConfigError, NotFoundError
from koclip.hf_import import (  # noqa: F401 (import_*_encoder, ImportedVision: public here too)
    ImportedVision, import_text_encoder, import_transformers_model, import_vision_encoder, is_transformers_model,
    read_json, transformers_model_config, unsupported_folder,
)
from koclip.modeling import KoCLIP
from koclip.params import check_params, flat_shapes, float32_params  # noqa: F401 (public here too)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flax_model.msgpack"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json",
)


@dataclass
class Checkpoint:
    config: HybridCLIPConfig
    params: dict
    path: str | None = None  # where it was loaded from; tokenizer files are read from here
    tokenizer_dir: str | None = None  # where tokenizer files come from when it was built, not loaded

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config, self.params)

    def model(self, dtype: str = "float32") -> KoCLIP:
        return KoCLIP(self.config, dtype)

    def tokenizer(self):
        from koclip.processing import load_tokenizer

        source = self.tokenizer_dir or self.path
        if source is None:
            raise CheckpointError("this checkpoint has no tokenizer files")
        return load_tokenizer(source)

    def encoding_tokenizer(self):
        """The tokenizer for encoding texts only (koclip.processing.load_encoding_tokenizer): the
        same ids as `tokenizer()`, without importing transformers when tokenizer.json suffices."""
        from koclip.processing import load_encoding_tokenizer

        source = self.tokenizer_dir or self.path
        if source is None:
            raise CheckpointError("this checkpoint has no tokenizer files")
        return load_encoding_tokenizer(source)


# ---------------------------------------------------------------- paths


def require_dir(path: str, what: str = "checkpoint directory") -> None:
    if not fs.is_dir(path):
        raise NotFoundError(f"{what} not found: {path}")


# ---------------------------------------------------------------- params


def fingerprint(config: HybridCLIPConfig, params: dict) -> str:
    """A stable hash of the config and every parameter (name, dtype, shape, bytes); 16 hex digits."""
    h = hashlib.sha256(json.dumps(config.fingerprint_dict(), sort_keys=True).encode())
    for key, value in sorted(flatten_dict(params, sep="/").items()):
        arr = np.ascontiguousarray(np.asarray(value))
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- our format


def save_checkpoint(path: str, config: HybridCLIPConfig, params: dict, tokenizer=None,
                    tokenizer_dir: str | None = None) -> str:
    """Write config.json, flax_model.msgpack and tokenizer files (from a tokenizer object or a dir)."""
    params = jax.device_get(params)
    fs.write_bytes(fs.join(path, WEIGHTS_NAME), serialization.msgpack_serialize(params))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            _copy_files(tmp, path, os.listdir(tmp))
    elif tokenizer_dir is not None:
        _copy_files(tokenizer_dir, path, TOKENIZER_FILES)
    # config.json last: a directory with a config is a complete checkpoint.
    fs.write_bytes(fs.join(path, CONFIG_NAME), config.to_json().encode())
    return path


def _copy_files(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src = fs.join(src_dir, name)
        if fs.exists(src):
            fs.write_bytes(fs.join(dst_dir, name), fs.read_bytes(src))


def _raw_config(path: str) -> dict | None:
    """config.json as a dict, or None when the folder has none."""
    require_dir(path)
    config_path = fs.join(path, CONFIG_NAME)
    return read_json(config_path) if fs.exists(config_path) else None


def _is_hybrid(raw: dict) -> bool:
    has = lambda name: bool(raw.get(name) or raw.get(f"{name}_dict"))
    return raw.get("model_type") in ("hybrid-clip", None) and has("text_config") and has("vision_config")


def load_config(path: str) -> HybridCLIPConfig:
    """The HybridCLIPConfig of any folder load_checkpoint reads (without reading the weights)."""
    return _config_of(path, _raw_config(path))


def _config_of(path: str, raw: dict | None) -> HybridCLIPConfig:
    if raw is not None and is_transformers_model(raw):
        return transformers_model_config(path, raw)
    if raw is None or not _is_hybrid(raw):
        raise CheckpointError(unsupported_folder(path, raw))
    try:
        return HybridCLIPConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{fs.join(path, CONFIG_NAME)}: {e}") from None


def load_checkpoint(path: str) -> Checkpoint:
    """Load any folder of a supported format; params become float32 numpy.

    The formats, told apart by config.json: ours and the published FlaxHybridCLIP ones
    (config.json + flax_model.msgpack), and transformers' VisionTextDualEncoderModel and CLIPModel
    folders (model_type "vision-text-dual-encoder" or "clip"; weights as koclip.hf_weights reads
    them). Anything
    else is a CheckpointError naming what the folder holds.
    """
    raw = _raw_config(path)
    if raw is not None and is_transformers_model(raw):
        config, params = import_transformers_model(path, raw)
        return Checkpoint(config, params, path=path)
    config = _config_of(path, raw)
    weights = fs.join(path, WEIGHTS_NAME)
    try:
        params = serialization.msgpack_restore(fs.read_bytes(weights))
    except FileNotFoundError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on a damaged file
        raise CheckpointError(f"{weights} is not a flax msgpack file: {e}") from None
    if set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, dict):
        raise CheckpointError(f"{weights} holds a {type(params).__name__}, not a parameter tree")
    check_params(config, params, where=weights)
    params = float32_params(params, weights)
    return Checkpoint(config, params, path=path)


# ---------------------------------------------------------------- a hybrid from two towers


def build_hybrid(text_dir: str, vision_dir: str, projection_dim: int | None = None,
                 reuse_clip_projection: bool = True, seed: int = 0, **config_fields) -> Checkpoint:
    """A new hybrid model from two transformers checkpoint directories, as FlaxHybridCLIP did.

    Projections are new (normal(0.02)), except that a CLIP vision tower's own visual projection
    is reused when `reuse_clip_projection` and the projection sizes agree. projection_dim
    defaults to the CLIP projection size, else 512.
    """
    text_config, text_params = import_text_encoder(text_dir)
    vision = import_vision_encoder(vision_dir)
    if projection_dim is None:
        projection_dim = vision.projection.shape[1] if vision.projection is not None else 512
    fields = {**vision.preprocessing, **config_fields}
    config = HybridCLIPConfig(text_config=text_config, vision_config=vision.config,
                              projection_dim=projection_dim, **fields)
    rng = np.random.default_rng(seed)
    new_projection = lambda rows: rng.normal(0.0, 0.02, (rows, projection_dim)).astype(np.float32)
    visual = new_projection(vision.config.hidden_size)
    if reuse_clip_projection and vision.projection is not None:
        if vision.projection.shape[1] != projection_dim:
            raise CheckpointError(
                f"CLIP's visual projection has size {vision.projection.shape[1]}, not projection_dim "
                f"{projection_dim}; pass that size, or do not reuse CLIP's projection")
        visual = vision.projection
    params = {
        "text_model": text_params,
        "vision_model": vision.params,
        "text_projection": {"kernel": new_projection(text_config.hidden_size)},
        "visual_projection": {"kernel": visual},
        "logit_scale": np.asarray(config.logit_scale_init, np.float32),
    }
    check_params(config, params, where="the built hybrid model")
    return Checkpoint(config, params, tokenizer_dir=text_dir)
