"""The one data-parallel mesh axis and the meshes built over it."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "data_mesh", "devices_for_batch", "global_mesh", "process_major_devices", "replicated",
           "rows"]

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """1-D mesh over `devices` (default: all local devices) on the axis DATA_AXIS."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), (DATA_AXIS,))


def rows(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first axis over the mesh's devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole by every device of the mesh."""
    return NamedSharding(mesh, P())


def devices_for_batch(devices, batch_size: int) -> list:
    """The first k of `devices` for the largest k that divides `batch_size`: a batch of 8
    on 3 or 6 devices uses 2 or 4 of them, rather than failing."""
    devices = list(devices)
    count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    return devices[:count]


def process_major_devices():
    """Every device, those of process 0 first (then by id): on a data axis in this order,
    process p's devices hold rows p*B/P .. (p+1)*B/P - 1 of a global batch, the rows
    `fmjax.training.loop.host_batch_indices` gives it."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def global_mesh() -> Mesh:
    """1-D mesh over every device of every process, in `process_major_devices()` order
    (on one host: `data_mesh()` up to device order)."""
    return data_mesh(process_major_devices())
