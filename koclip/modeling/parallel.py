"""Data-parallel encoding over all local devices, with a fixed batch shape.

`BatchEncoder` wraps one of KoCLIP's encode functions: it pads each batch to `batch_size` rows
(a multiple of the device count), shards the rows over a 1-D device mesh with `jax.sharding`,
replicates the params, and counts how often the function is traced (each trace is a compile),
so callers can report recompiles.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_rows(array, mesh: Mesh):
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


class BatchEncoder:
    """encode(params, *arrays) -> [B, ...] on padded, sharded fixed-size batches.

    `fn` is a pure function such as KoCLIP.encode_image; every array argument has the batch on
    axis 0. Calling with N rows returns exactly N rows, whatever the padding.
    """

    def __init__(self, fn: Callable, params, batch_size: int, devices=None):
        self.mesh = data_mesh(devices)
        n = self.mesh.size
        self.batch_size = -(-batch_size // n) * n
        self.params = replicate(params, self.mesh)
        self.compiles = 0

        def traced(params, *arrays):
            self.compiles += 1  # runs at trace time only
            return fn(params, *arrays)

        self._fn = jax.jit(traced)

    def __call__(self, *arrays) -> np.ndarray:
        rows = arrays[0].shape[0]
        outputs = []
        for start in range(0, rows, self.batch_size):
            chunk = [np.asarray(a[start:start + self.batch_size]) for a in arrays]
            real = chunk[0].shape[0]
            if real < self.batch_size:
                chunk = [np.concatenate([c, np.zeros((self.batch_size - real, *c.shape[1:]), c.dtype)]) for c in chunk]
            out = self._fn(self.params, *(shard_rows(c, self.mesh) for c in chunk))
            outputs.append(np.asarray(out)[:real])
        if not outputs:
            raise ValueError("nothing to encode: the batch is empty")
        return np.concatenate(outputs)
