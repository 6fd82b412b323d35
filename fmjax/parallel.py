"""Data-parallel training variants and multi-host helpers.

Two ways to spread one global batch over devices, with the same result:

* the mesh path, `fmjax.train.make_step_fn`: `jax.jit` over a 1-D `data` mesh, batch
  sharded with `P('data')`, state replicated (the recommended path);
* the pmap path, `make_pmap_step_fn` here: `jax.pmap(axis_name='data')` over the same
  pure step, gradients and metrics averaged with `lax.pmean`.

Equality: the mesh path draws the step's randomness (flips, patch corners, times t,
noise eps, dropout masks) for the whole global batch from fold_in(run key, step). The
pmap step draws exactly the same global arrays on every device and keeps the rows of its
own batch shard (`lax.axis_index('data')`); dropout masks too (see `global_dropout`). The
per-device losses are means over equal-sized shards, so their `pmean` is the global mean
and the averaged gradients are the global-batch gradients. The two paths then differ only
by the order of floating-point sums.

The step is split into pieces both paths share (`draw_step_noise`, `apply_augment`,
`flow_loss`, `apply_gradients`); `train_step` composes them and equals
`fmjax.train.train_step` bit for bit.

Multi-host (one process per host; every process runs the same command)
----------------------------------------------------------------------
`maybe_initialize_distributed()` must run before any other JAX call. Each process then
reads only its part of every global batch (`host_batch_indices`), and only process 0
writes checkpoints and logs (`is_writer`). Devices are ordered by process, so process p's
rows of the global batch go to its local devices, in order.

TPU pod slice (the workers are found from the TPU VM metadata; FMJAX_DISTRIBUTED=1 opts in)::

    gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \\
        --command="FMJAX_DISTRIBUTED=1 fmjax train --preset paper --data mvtec:/data/mvtec \\
                   --category bottle --out /shared/runs/bottle"

Several GPU hosts (here 2 hosts; host 0 at 10.0.0.1 runs the coordinator on port 1234)::

    # on host 0
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
        fmjax train --preset paper --data mvtec:/data/mvtec --category bottle --out /shared/runs/bottle
    # on host 1
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
        fmjax train --preset paper --data mvtec:/data/mvtec --category bottle --out /shared/runs/bottle

Under Slurm (`srun --nodes=2 --ntasks-per-node=1 fmjax train ...`) or Open MPI
(`mpirun -np 2 fmjax train ...`) no variables are needed: JAX reads the job's own.
`--out` must be on storage every host can reach (a shared file system or a bucket).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import flow
from fmjax.config import Config, TrainConfig
from fmjax.train import TrainState, batch_indices, make_optimizer

AXIS = "data"


# ----------------------------------------------------------------------------- the shared step

class StepNoise(NamedTuple):
    """All the randomness of one step for a batch of N images (None: not drawn)."""

    hflip: Any  # bool [N,1,1,1] or None
    vflip: Any  # bool [N,1,1,1] or None
    corners: Any  # int [N,2] patch corners or None
    t: Any  # float [N] path times
    eps: Any  # float32 [N,h,w,C] noise (h, w: the patch size when cropping)
    dropout_key: Any  # key for the network's dropout (masks over the whole batch)


def draw_step_noise(key, images_shape, cfg: TrainConfig) -> StepNoise:
    """The step's randomness for a batch of `images_shape` (N,H,W,C), from the step key
    fold_in(run key, step); the same draws `fmjax.train.train_step` makes."""
    key_aug, key_loss, key_drop = jax.random.split(key, 3)
    n, h, w, c = images_shape
    kh, kv, kc = jax.random.split(key_aug, 3)
    hflip = jax.random.bernoulli(kh, 0.5, (n, 1, 1, 1)) if cfg.hflip else None
    vflip = jax.random.bernoulli(kv, 0.5, (n, 1, 1, 1)) if cfg.vflip else None
    corners = None
    if cfg.patch_size:
        p = cfg.patch_size
        corners = jax.random.randint(kc, (n, 2), 0, jnp.array([h - p + 1, w - p + 1]))
        h = w = p
    key_t, key_eps = jax.random.split(key_loss)
    t = flow.sample_times(key_t, n, cfg.t_sampler, cfg.logit_normal_mean, cfg.logit_normal_std)
    eps = jax.random.normal(key_eps, (n, h, w, c), jnp.float32)
    return StepNoise(hflip, vflip, corners, t, eps, key_drop)


def slice_noise(noise: StepNoise, start, size: int) -> StepNoise:
    """Rows [start, start + size) of every per-image draw (`start` may be traced)."""
    take = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, size, 0)
    return StepNoise(take(noise.hflip), take(noise.vflip), take(noise.corners), take(noise.t),
                     take(noise.eps), noise.dropout_key)


def apply_augment(images, noise: StepNoise, cfg: TrainConfig):
    """Flips and patch crops of images [N,H,W,C] as drawn in `noise`."""
    if noise.hflip is not None:
        images = jnp.where(noise.hflip, images[:, :, ::-1], images)
    if noise.vflip is not None:
        images = jnp.where(noise.vflip, images[:, ::-1], images)
    if noise.corners is not None:
        c = images.shape[-1]
        p = cfg.patch_size
        crop = lambda img, yx: lax.dynamic_slice(img, (yx[0], yx[1], 0), (p, p, c))
        images = jax.vmap(crop)(images, noise.corners)
    return images


def flow_loss(params, x, noise: StepNoise, labels, *, module, config: Config):
    """Mean squared velocity error on data x [N,h,w,C] in [-1, 1] with the drawn t and eps."""
    y = labels if config.net.num_classes > 0 else None
    xt = flow.path_point(noise.eps, x, noise.t)
    v = module.apply(params, xt, noise.t, y, train=True, rngs={"dropout": noise.dropout_key})
    return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.target_velocity(noise.eps, x)))


def apply_gradients(state: TrainState, grads, cfg: TrainConfig) -> TrainState:
    """The optimizer update and the EMA (with warm-up: early steps average fewer steps)."""
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def train_step(state: TrainState, images_u8, labels, run_key, *, module, config: Config):
    """`fmjax.train.train_step` composed of the shared pieces (bit-identical results)."""
    cfg = config.train
    noise = draw_step_noise(jax.random.fold_in(run_key, state.step), images_u8.shape, cfg)
    with jax.named_scope("augment"):
        x = apply_augment(flow.to_model_range(images_u8), noise, cfg)
    with jax.named_scope("grad"):
        loss, grads = jax.value_and_grad(flow_loss)(state.params, x, noise, labels, module=module, config=config)
    with jax.named_scope("update"):
        state = apply_gradients(state, grads, cfg)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


# ----------------------------------------------------------------------------- pmap

def global_dropout(shard_index, num_shards: int):
    """Context manager: every `nn.Dropout` call inside draws its mask for the global batch
    (`num_shards` times the local leading axis) with the same key as the unsharded network
    and applies the rows of shard `shard_index`, so dropout matches the mesh path exactly.
    Assumes dropout inputs carry the batch on axis 0 (true of every fmjax network)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        inputs, *rest = args
        deterministic = kwargs.get("deterministic", rest[0] if rest else None)
        deterministic = module.deterministic if deterministic is None else deterministic
        if module.rate == 0.0 or module.rate == 1.0 or deterministic:
            return next_fun(*args, **kwargs)
        local = inputs.shape[0]
        # Dropout of ones over the global shape: 1/keep where kept, 0 where dropped
        ones = jnp.ones((local * num_shards,) + inputs.shape[1:], inputs.dtype)
        scaled_mask = next_fun(ones, *rest, **kwargs)
        keep = lax.dynamic_slice_in_dim(scaled_mask, shard_index * local, local, 0) != 0
        return lax.select(keep, inputs / (1.0 - module.rate), jnp.zeros_like(inputs))

    return nn.intercept_methods(interceptor)


def pmap_train_step(state: TrainState, images_u8, labels, run_key, *, module, config: Config,
                    axis_name: str = AXIS):
    """`train_step` for one device's shard under `pmap(axis_name=...)`: the global batch's
    randomness sliced to this shard, gradients and metrics `pmean`ed over devices.
    images_u8: uint8 [B/n,H,W,C] (this device's rows of the global batch, in order)."""
    cfg = config.train
    num_shards = lax.axis_size(axis_name)
    index = lax.axis_index(axis_name)
    local = images_u8.shape[0]
    global_shape = (local * num_shards,) + tuple(images_u8.shape[1:])
    noise = draw_step_noise(jax.random.fold_in(run_key, state.step), global_shape, cfg)
    noise = slice_noise(noise, index * local, local)
    with jax.named_scope("augment"):
        x = apply_augment(flow.to_model_range(images_u8), noise, cfg)

    def loss_fn(params):
        with global_dropout(index, num_shards):
            return flow_loss(params, x, noise, labels, module=module, config=config)

    with jax.named_scope("grad"):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        # equal shard sizes: the mean of the shard means is the global mean
        grads = lax.pmean(grads, axis_name)
        loss = lax.pmean(loss, axis_name)
    with jax.named_scope("update"):
        state = apply_gradients(state, grads, cfg)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def make_pmap_step_fn(module, config: Config, devices=None):
    """pmap(pmap_train_step) over `devices` (default: all local devices).

    Call it as step(state, images, labels, run_key) with `state` from `replicate`, images
    [n, B/n, H, W, C] and labels [n, B/n] from `shard_batch`, and one (unreplicated)
    run_key; returns (state, metrics), both with a leading device axis (`unreplicate`).
    The state argument is donated."""
    step = lambda state, images, labels, key: pmap_train_step(state, images, labels, key,
                                                              module=module, config=config)
    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, None), devices=devices, donate_argnums=0)


def replicate(tree, devices=None):
    """One copy of every leaf per device: leaves [*shape] -> [n, *shape], split over
    `devices` (default: all local devices) along the leading axis."""
    devices = list(devices if devices is not None else jax.local_devices())
    sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), P(AXIS))

    def put(leaf):
        leaf = jnp.asarray(leaf) if not isinstance(leaf, (jax.Array, np.ndarray)) else leaf
        row = leaf[None]
        shards = [jax.device_put(row, d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + tuple(leaf.shape), sharding, shards)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first device's copy of every leaf: [n, *shape] -> [*shape]."""
    return jax.tree.map(lambda leaf: leaf[0], tree)


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


def global_mesh():
    """1-D `data` mesh over every device of every process (jax.devices() is ordered by
    process, so process p's local devices hold its rows of the global batch)."""
    return jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))


def assemble_global_batch(local_batch, mesh):
    """This process's rows [B/p, ...] -> the global batch [B, ...] sharded P('data') over
    `mesh` (for the mesh path's step function on several hosts)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), np.asarray(local_batch))
