"""Data-parallel training variants and multi-host helpers.

Two ways to spread one global batch over devices, with the same result:

* the mesh path, `fmjax.train.make_step_fn`: `jax.jit` over a 1-D `data` mesh, batch
  sharded with `P('data')`, state replicated, the loss and its gradient taken per device
  under `jax.shard_map` (the recommended path);
* the pmap path, `make_pmap_step_fn` here: `jax.pmap(axis_name='data')` over the same
  pure step. `jax.pmap` takes no compiler options, so on CPU this path runs without
  `fmjax.xla_options` (slower convolutions).

Equality: the mesh path draws the step's randomness (flips, patch corners, times t,
noise eps, dropout masks) for the whole global batch from fold_in(run key, step). The
pmap step draws exactly the same global arrays on every device and keeps the rows of its
own batch shard (`lax.axis_index('data')`). On both paths a device's dropout masks are
its rows of the global masks, drawn alone (see `global_dropout`), and a device
differentiates its shard's mean loss / n; summed over the n equal shards, that is the
global mean and its gradient (`fmjax.train.shard_loss_and_grads`). The two paths then
differ only by the order of floating-point sums. (The price: each pmap device draws the
global batch's flips, times and noise eps, n times the work of its own share; small next
to the network.)

Both paths build the step from the same pieces of fmjax/train.py (`draw_step_noise`,
`apply_augment`, `shard_loss_and_grads`, `apply_gradients`).

Multi-host (several processes, each running the same command)
--------------------------------------------------------------
`maybe_initialize_distributed()` must run before any other JAX call (the `fmjax` command
line calls it first). Each process then
reads only its part of every global batch (`host_batch_indices`) and hands it to its own
devices (`assemble_global_batch` on `global_mesh()`, or `shard_batch` for the pmap step);
the data axis orders devices process by process (`process_major_devices`), so the global
batch is the single-host batch in the same order. Only process 0 writes config.json, logs
and progress (`is_writer`); orbax checkpoint saves are collective: every process calls
them and orbax writes once.

TPU pod slice, one process per TPU VM (JAX finds the workers from the TPU VM metadata;
FMJAX_DISTRIBUTED=1 opts in; every worker needs the data at the same path)::

    gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \\
        --command="FMJAX_DISTRIBUTED=1 fmjax train --preset paper --data mvtec:/data/mvtec \\
                   --category bottle --out /shared/runs/bottle"

Several GPU hosts, one process per host using all its GPUs (here 2 hosts; host 0 at
10.0.0.1 runs the coordinator on port 1234)::

    # on host 0
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
        fmjax train --preset paper --data mvtec:/data/mvtec --category bottle --out /shared/runs/bottle
    # on host 1
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
        fmjax train --preset paper --data mvtec:/data/mvtec --category bottle --out /shared/runs/bottle

Under Slurm or Open MPI no variables are needed (JAX reads the job's own) and JAX gives
each process one GPU, so start one process per GPU, e.g. for 2 nodes of 8 GPUs
`srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 fmjax train ...` or
`mpirun -np 16 --npernode 8 fmjax train ...`.

`--out` must be a folder every process can reach (a shared file system).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import flow
from fmjax.config import Config
from fmjax.nets.dropout import global_dropout  # noqa: F401
# the step's pieces live in fmjax/train.py; re-exported here
from fmjax.train import (StepNoise, TrainState, apply_augment, apply_gradients, batch_indices,  # noqa: F401
                         draw_augment, draw_step_noise, flow_loss, packs_gradients, shard_loss_and_grads,
                         train_step)

AXIS = "data"


# ----------------------------------------------------------------------------- the shared step

def slice_noise(noise: StepNoise, start, size: int) -> StepNoise:
    """Rows [start, start + size) of every per-image draw (`start` may be traced)."""
    take = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, size, 0)
    return StepNoise(take(noise.hflip), take(noise.vflip), take(noise.corners), take(noise.t),
                     take(noise.eps), noise.dropout_key)


# ----------------------------------------------------------------------------- pmap

def pmap_train_step(state: TrainState, images_u8, labels, run_key, *, module, config: Config,
                    axis_name: str = AXIS, pack: bool = True):
    """`train_step` for one device's shard under `pmap(axis_name=...)`: the global batch's
    randomness sliced to this shard, loss and gradients averaged over devices
    (`shard_loss_and_grads`; `pack`: small gradients packed, for CPU devices).
    images_u8: uint8 [B/n,H,W,C] (this device's rows of the global batch, in order)."""
    cfg = config.train
    num_shards = lax.axis_size(axis_name)
    index = lax.axis_index(axis_name)
    local = images_u8.shape[0]
    global_shape = (local * num_shards,) + tuple(images_u8.shape[1:])
    noise = draw_step_noise(jax.random.fold_in(run_key, state.step), global_shape, cfg)
    noise = slice_noise(noise, index * local, local)
    with jax.named_scope("augment"):
        x = flow.to_model_range(apply_augment(images_u8, noise.hflip, noise.vflip, noise.corners, cfg))
    with jax.named_scope("grad"):
        loss, grads = shard_loss_and_grads(state.params, x, noise, labels, module=module, config=config,
                                           axis_name=axis_name, pack=pack)
    with jax.named_scope("update"):
        state = apply_gradients(state, grads, cfg)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def make_pmap_step_fn(module, config: Config, devices=None):
    """pmap(pmap_train_step) over `devices` (default: `process_major_devices()`, i.e. all
    local devices on one host and every device, process by process, on several).

    Call it as step(state, images, labels, run_key) with `state` from `replicate`, images
    [n, B/n, H, W, C] and labels [n, B/n] from `shard_batch` (n: this process's devices;
    on several hosts each passes its own rows, `host_batch_indices`), and one
    (unreplicated) run_key; returns (state, metrics), both with a leading device axis
    (`unreplicate`). The state argument is donated."""
    devices = process_major_devices() if devices is None else list(devices)
    pack = packs_gradients(devices)
    step = lambda state, images, labels, key: pmap_train_step(state, images, labels, key,
                                                              module=module, config=config, pack=pack)
    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, None), devices=devices, donate_argnums=0)


def replicate(tree, devices=None):
    """One copy of every leaf per device: leaves [*shape] -> [n, *shape], split over
    `devices` (default: this process's devices in `process_major_devices()` order) along
    the leading axis."""
    if devices is None:
        devices = [d for d in process_major_devices() if d.process_index == jax.process_index()]
    devices = list(devices)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), P(AXIS))

    def put(leaf):
        leaf = leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf)
        row = leaf[None]
        shards = [jax.device_put(row, d) for d in devices]
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
    sharding = NamedSharding(global_mesh(), P())

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


# ----------------------------------------------------------------------------- multi-host

_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _distributed_request(env: Mapping[str, str]):
    """initialize() keyword arguments when `env` asks for a multi-process run, else None."""
    address = next((env[k] for k in _ADDRESS_VARS if env.get(k)), None)
    if address is not None:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"{' and '.join(missing)} must be set with the coordinator address {address!r}")
        return {"coordinator_address": address, "num_processes": int(env["JAX_NUM_PROCESSES"]),
                "process_id": int(env["JAX_PROCESS_ID"])}
    if env.get("FMJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return {}  # JAX auto-detects the cluster (TPU VM metadata, Slurm, Open MPI, ...)
    if all(k in env for k in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return {}
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process
    run; returns whether it did. Must run before any other JAX computation.

    Recognised (in this order): JAX_COORDINATOR_ADDRESS (or COORDINATOR_ADDRESS) with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; FMJAX_DISTRIBUTED=1 (let JAX detect the cluster,
    e.g. on a TPU pod slice); a Slurm job with more than one task; an Open MPI launch with
    more than one rank; TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES naming several hosts,
    or MEGASCALE_COORDINATOR_ADDRESS (multi-slice TPU). An already initialized runtime is
    left alone (returns False)."""
    request = _distributed_request(os.environ if environ is None else environ)
    if request is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**request)
    return True


def process_shard(num_items: int, process_index: int, process_count: int) -> slice:
    """The contiguous part of `num_items` (a global batch) that process `process_index` of
    `process_count` handles; the parts in process order make up the whole."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if num_items % process_count:
        raise ValueError(f"global batch of {num_items} does not split over {process_count} processes; "
                         f"use a train.batch_size that is a multiple of {process_count}")
    per = num_items // process_count
    return slice(process_index * per, (process_index + 1) * per)


def host_batch_indices(step: int, num_items: int, global_batch: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
    """Indices of the images this process reads for `step`: its slice of
    `fmjax.train.batch_indices(step, num_items, global_batch, seed)`; concatenated over
    processes in order they are exactly the single-host batch. Defaults: this process."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    part = process_shard(global_batch, process_index, process_count)
    return batch_indices(step, num_items, global_batch, seed)[part]


def is_writer(process_index: int | None = None) -> bool:
    """Whether this process (default: the current one) writes checkpoints, logs and
    config.json: process 0 only."""
    return (jax.process_index() if process_index is None else process_index) == 0


def process_major_devices():
    """Every device, those of process 0 first (then by id): on a data axis in this order,
    process p's devices hold rows p*B/P .. (p+1)*B/P - 1 of a global batch, the rows
    `host_batch_indices` gives it."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def global_mesh():
    """1-D `data` mesh over every device of every process, in `process_major_devices()` order
    (on one host: `fmjax.train.data_mesh()` up to device order)."""
    return jax.sharding.Mesh(np.array(process_major_devices()), (AXIS,))


def assemble_global_batch(local_batch, mesh):
    """This process's rows [B/P, ...] -> the global batch [B, ...] sharded P('data') over
    `mesh` (`global_mesh()`), for the mesh path's step function on several hosts."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), np.asarray(local_batch))
