"""Arrays onto devices: copies per device for the pmap step, and one process's rows of a
global batch."""
from __future__ import annotations

import jax
import numpy as np

from fmjax.distributed.mesh import data_mesh, global_mesh, process_major_devices, replicated, rows

__all__ = ["assemble_global_batch", "replicate", "shard_batch", "unreplicate"]


def replicate(tree, devices=None):
    """One copy of every leaf per device: leaves [*shape] -> [n, *shape], split over
    `devices` (default: this process's devices in `process_major_devices()` order) along
    the leading axis."""
    if devices is None:
        devices = [d for d in process_major_devices() if d.process_index == jax.process_index()]
    devices = list(devices)
    sharding = rows(data_mesh(devices))

    def put(leaf):
        leaf = leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf)
        shards = [jax.device_put(leaf[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + tuple(leaf.shape), sharding, shards)

    return jax.tree.map(put, tree)


@jax.jit
def _first_copy(tree):
    return jax.tree.map(lambda leaf: leaf[0], tree)


def unreplicate(tree):
    """One copy of every replicated leaf: [n, *shape] -> [*shape] (one compiled program for
    the whole tree). On several processes the copies become one global array, replicated
    over `global_mesh()` (what orbax saves)."""
    if jax.process_count() == 1:
        return _first_copy(tree)
    sharding = replicated(global_mesh())

    def to_global(leaf):  # the local copies of a pmap output: one [1, *shape] shard per device
        copies = [shard.data[0] for shard in leaf.addressable_shards]
        return jax.make_array_from_single_device_arrays(tuple(leaf.shape[1:]), sharding, copies)

    return jax.tree.map(to_global, tree)


def shard_batch(x, n: int):
    """[B, ...] -> [n, B/n, ...] (device d gets rows d*B/n .. (d+1)*B/n - 1)."""
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} does not split over {n} devices; "
                         f"use a batch size that is a multiple of {n}")
    return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))


def assemble_global_batch(local_batch, mesh):
    """This process's rows [B/P, ...] -> the global batch [B, ...] split over `mesh`
    (`global_mesh()`), for the mesh step on several hosts."""
    return jax.make_array_from_process_local_data(rows(mesh), np.asarray(local_batch))
