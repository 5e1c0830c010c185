"""transformers (PyTorch) weight files: reading them into numpy, renaming them into our Flax tree.

A transformers folder holds its weights as `model.safetensors`, as shards listed in
`model.safetensors.index.json`, or (older saves, e.g. koclip/koclip-base-pt) as
`pytorch_model.bin` or shards listed in `pytorch_model.bin.index.json`. The .bin files are
pickles: they are read with torch's weights-only loader, so torch is needed for them only.
"""
from __future__ import annotations

import io
import json
import logging

import numpy as np
from flax.traverse_util import unflatten_dict

from koclip import fs
from koclip.errors import CheckpointError, MissingDependency, NotFoundError
from koclip.params import float32_params, mismatch

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(fs.read_bytes(path))


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MissingDependency(
            f"{path} is a PyTorch pickle and reading it needs torch: pip install torch, or convert it "
            "to model.safetensors (transformers' save_pretrained writes that)") from None
    try:
        state = torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or non-weights pickle raises several unrelated types
        raise CheckpointError(f"{path} is not a PyTorch weights file torch can load weights-only: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    # numpy has no bfloat16; every weight becomes float32 on loading anyway.
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _shards(folder: str, index_name: str) -> list[str]:
    index_path = fs.join(folder, index_name)
    try:
        weight_map = json.loads(fs.read_bytes(index_path).decode())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a weights index (a JSON object with a weight_map): {e}") from None
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not fs.exists(fs.join(folder, name))]
    if missing:
        raise CheckpointError(f"{index_path} lists shard(s) not in the folder: {', '.join(missing)}")
    return [fs.join(folder, name) for name in names]


def weights_file(folder: str) -> str | None:
    """The name of the first weights file of WEIGHT_NAMES the folder holds, or None."""
    return next((name for name in WEIGHT_NAMES if fs.exists(fs.join(folder, name))), None)


def read_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """(every tensor by its PyTorch name, the path of what was read); safetensors preferred."""
    name = weights_file(folder)
    if name is None:
        raise NotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")
    source = fs.join(folder, name)
    if name in (SAFETENSORS_NAME, TORCH_NAME):
        paths = [source]
    else:
        paths = _shards(folder, name)
    reader = _read_safetensors if name.startswith(SAFETENSORS_NAME) else _read_torch
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        tensors.update(reader(path))
    return tensors, source


def torch_to_flax(tensors: dict[str, np.ndarray], expected: dict[str, tuple], roots: tuple[str, ...]):
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


def strip_prefix(tensors: dict, prefixes: tuple[str, ...]) -> dict:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def fit(converted: dict, expected: dict, source: str, may_init: tuple[str, ...] = ()) -> dict:
    """Check converted tensors against the expected shapes; fill `may_init` keys if absent."""
    missing = sorted(set(expected) - set(converted))
    fillable = [k for k in missing if k.startswith(may_init)] if may_init else []
    if fillable:
        log.warning("%s has no %s; initialising them randomly", source, ", ".join(fillable))
        rng = np.random.default_rng(0)
        for k in fillable:
            converted[k] = (rng.normal(0, 0.02, expected[k]) if k.endswith("kernel")
                            else np.zeros(expected[k])).astype(np.float32)
    problems = mismatch(expected, {k: tuple(np.shape(v)) for k, v in converted.items()})
    if problems:
        raise CheckpointError(f"{source} does not fit its config.json; {problems}")
    return float32_params(unflatten_dict({tuple(k.split("/")): v for k, v in converted.items()}), source)
