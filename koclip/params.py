"""Checks on a parameter tree against what a config's model expects: keys, shapes, dtypes, values."""
from __future__ import annotations

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koclip.config import HybridCLIPConfig
from koclip.errors import CheckpointError
from koclip.modeling import KoCLIP


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(tree).items()}


def expected_shapes(config: HybridCLIPConfig) -> dict[str, tuple[int, ...]]:
    """The flat shapes of the model `config` describes, without allocating it."""
    return flat_shapes(KoCLIP(config).param_shapes())


def mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
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
    problems = mismatch(expected_shapes(config), flat_shapes(params))
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
