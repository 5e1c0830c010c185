"""Checkpoints: our own format, import of HF safetensors weights, and the model fingerprint.

A checkpoint is a directory (local or any fsspec URL, e.g. gs://) holding
  config.json          HybridCLIPConfig (FlaxHybridCLIP's layout plus our fields)
  flax_model.msgpack   the parameter tree, flax msgpack, FlaxHybridCLIP's names
  tokenizer files      whatever `PreTrainedTokenizer.save_pretrained` writes
The checkpoints that KoCLIP and clip-italian published have the same two model files, so they
load as they are.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import jax
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from koclip import fs
from koclip.config import HybridCLIPConfig, TextConfig, VisionConfig
from koclip.errors import CheckpointError, ConfigError, NotFoundError
from koclip.modeling import KoCLIP

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flax_model.msgpack"
HF_WEIGHTS_NAME = "model.safetensors"
HF_PREPROCESSOR_NAME = "preprocessor_config.json"
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


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(tree).items()}


def _mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """"" when `found` has exactly the expected keys and shapes; else what differs, in one line."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k} (has {list(found[k])}, config wants {list(expected[k])})"
                 for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    return "; ".join(problems)


def check_params(config: HybridCLIPConfig, params: dict, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    problems = _mismatch(flat_shapes(KoCLIP(config).param_shapes()), flat_shapes(params))
    if problems:
        raise CheckpointError(f"{where} does not fit its config; {problems}")


def float32_params(params: dict, where: str) -> dict:
    """Every parameter as float32, after checking it is a floating-point array of finite numbers
    (float16/bfloat16/float32/float64); CheckpointError naming the first one that is not. NaN or
    integer weights would otherwise load and give NaN embeddings, written to shards and indexes."""
    out = {}
    for key, value in sorted(flatten_dict(params, sep="/").items()):
        array = np.asarray(value)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            raise CheckpointError(f"{where}: parameter {key} has dtype {array.dtype}, not a floating-point type")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise CheckpointError(f"{where}: parameter {key} holds {bad} non-finite value(s) (NaN or inf)")
        out[key] = array
    return unflatten_dict(out, sep="/")


def fingerprint(config: HybridCLIPConfig, params: dict) -> str:
    """A stable hash of the config and every parameter (name, dtype, shape, bytes); 16 hex digits."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
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


def load_config(path: str) -> HybridCLIPConfig:
    require_dir(path)
    raw = fs.read_bytes(fs.join(path, CONFIG_NAME))
    try:
        return HybridCLIPConfig.from_json(raw.decode())
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{fs.join(path, CONFIG_NAME)}: {e}") from None


def load_checkpoint(path: str) -> Checkpoint:
    """Load our checkpoints and the published FlaxHybridCLIP ones; params become float32 numpy."""
    config = load_config(path)
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


# ---------------------------------------------------------------- HF safetensors import


def _read_json(path: str) -> dict:
    return json.loads(fs.read_bytes(path).decode())


def _read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    path = fs.join(hf_dir, HF_WEIGHTS_NAME)
    if not fs.exists(path):
        raise NotFoundError(
            f"no {HF_WEIGHTS_NAME} in {hf_dir} (only safetensors weights are imported; convert "
            "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))"
        )
    return load(fs.read_bytes(path))


def _torch_to_flax(tensors: dict[str, np.ndarray], expected: dict[str, tuple], roots: tuple[str, ...]):
    """Rename and re-layout PyTorch tensors into our tree, guided by the expected flat shapes.

    Linear [out, in] -> kernel [in, out]; Conv [out, in, kh, kw] -> kernel [kh, kw, in, out];
    LayerNorm weight -> scale; Embedding weight -> embedding; other tensors keep their name.
    Tensors outside `roots` (task heads, position-id buffers, the other tower of a CLIPModel)
    are skipped.
    """
    out = {}
    for name, value in tensors.items():
        path = name.replace(".", "/")
        if not path.startswith(roots):
            continue
        stem, _, leaf = path.rpartition("/")
        if leaf in ("weight", "gamma") and f"{stem}/kernel" in expected:
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
            out[f"{stem}/kernel"] = value
        elif leaf in ("weight", "gamma") and f"{stem}/scale" in expected:
            out[f"{stem}/scale"] = value
        elif leaf == "weight" and f"{stem}/embedding" in expected:
            out[f"{stem}/embedding"] = value
        elif leaf == "beta" and f"{stem}/bias" in expected:
            out[f"{stem}/bias"] = value
        elif path in expected:
            out[path] = value
    return out


def _strip_prefix(tensors: dict, prefixes: tuple[str, ...]) -> dict:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def _fit(converted: dict, expected: dict, source: str, may_init: tuple[str, ...] = ()) -> dict:
    """Check converted tensors against the expected shapes; fill `may_init` keys if absent."""
    missing = sorted(set(expected) - set(converted))
    fillable = [k for k in missing if k.startswith(may_init)]
    if fillable:
        log.warning("%s has no %s; initialising them randomly", source, ", ".join(fillable))
        rng = np.random.default_rng(0)
        for k in fillable:
            converted[k] = (rng.normal(0, 0.02, expected[k]) if k.endswith("kernel")
                            else np.zeros(expected[k])).astype(np.float32)
    problems = _mismatch(expected, {k: tuple(v.shape) for k, v in converted.items()})
    if problems:
        raise CheckpointError(f"{source} does not fit its config.json; {problems}")
    return float32_params(unflatten_dict({tuple(k.split("/")): v for k, v in converted.items()}), source)


# Stand-ins for the other tower when only one tower's parameter shapes are wanted.
_TINY_TEXT = TextConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=8)
_TINY_VISION = VisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                            image_size=8, patch_size=8)


def _read_tower(hf_dir: str, what: str, config_cls, tower: str):
    """(the tower's config, the flat shapes our tree expects for it) from an HF config.json."""
    require_dir(hf_dir, f"{what} checkpoint directory")
    try:
        tower_config = config_cls.from_dict(_read_json(fs.join(hf_dir, CONFIG_NAME)))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{hf_dir}: {e}") from None
    other = {"text_config": _TINY_TEXT, "vision_config": _TINY_VISION}
    other["text_config" if tower == "text_model" else "vision_config"] = tower_config
    return tower_config, flat_shapes(KoCLIP(HybridCLIPConfig(**other)).param_shapes()[tower])


def import_text_encoder(hf_dir: str) -> tuple[TextConfig, dict]:
    """A transformers BERT/RoBERTa directory (config.json + model.safetensors) -> (config, params)."""
    text_config, expected = _read_tower(hf_dir, "text", TextConfig, "text_model")
    tensors = _strip_prefix(_read_safetensors(hf_dir), ("bert.", "roberta.", "model."))
    converted = _torch_to_flax(tensors, expected, ("embeddings/", "encoder/", "pooler/"))
    # Masked-LM checkpoints ship without the pooler; transformers initialises it too.
    return text_config, _fit(converted, expected, fs.join(hf_dir, HF_WEIGHTS_NAME), may_init=("pooler/",))


@dataclass
class ImportedVision:
    config: VisionConfig
    params: dict
    projection: np.ndarray | None  # CLIP's own visual_projection kernel [hidden, proj], if present
    preprocessing: dict  # image_mean / image_std / image_resize found in preprocessor_config.json


def import_vision_encoder(hf_dir: str) -> ImportedVision:
    """A transformers CLIP (full or vision-only) or ViT directory -> our vision tree."""
    vision_config, expected = _read_tower(hf_dir, "vision", VisionConfig, "vision_model")
    tensors = _read_safetensors(hf_dir)
    projection = None
    if vision_config.model_type == "clip_vision_model":
        if not any(k.startswith("vision_model.") for k in tensors):
            # transformers 5 saves a bare CLIPVisionModel without the vision_model. prefix.
            tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
        if "vision_model.visual_projection.weight" in tensors:
            tensors["visual_projection.weight"] = tensors.pop("vision_model.visual_projection.weight")
        if "visual_projection.weight" in tensors:
            projection = np.asarray(tensors["visual_projection.weight"], np.float32).T
        converted = _torch_to_flax(tensors, expected, ("vision_model/",))
        may_init: tuple[str, ...] = ()
    else:
        tensors = _strip_prefix(tensors, ("vit.",))
        converted = _torch_to_flax(tensors, expected, ("embeddings/", "encoder/", "layernorm/", "pooler/"))
        may_init = ("pooler/",)  # ViTForImageClassification has no pooler
    params = _fit(converted, expected, fs.join(hf_dir, HF_WEIGHTS_NAME), may_init=may_init)
    return ImportedVision(vision_config, params, projection, _read_preprocessing(hf_dir))


def _read_preprocessing(hf_dir: str) -> dict:
    path = fs.join(hf_dir, HF_PREPROCESSOR_NAME)
    if not fs.exists(path):
        return {}
    raw = _read_json(path)
    found = {k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw}
    size = raw.get("size")
    if isinstance(size, dict) and "shortest_edge" in size:
        found["image_resize"] = int(size["shortest_edge"])
    elif isinstance(size, int):
        found["image_resize"] = size
    return found


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
