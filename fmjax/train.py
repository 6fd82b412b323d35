"""Flow-matching training: TrainState, the pure jitted step over a 1-D `data` mesh, the
loop (EMA, progress, JSONL log) and orbax checkpoints with bit-exact resume.

Randomness: the step key is fold_in(run key, step) and the batch order is a function of
(seed, step) only, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import flow, xla_options
from fmjax.config import Config, ConfigError, TrainConfig
from fmjax.nets import unet
from fmjax.nets.dropout import global_dropout


class TrainError(RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another config, ...)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up; optional update-RMS clipping (StableAdamW-style)."""
    schedule = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))
    if cfg.update_rms_clip:
        # per tensor: update / max(1, RMS(update)), the StableAdamW learning-rate clip
        parts.append(optax.clip_by_block_rms(1.0))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule if cfg.warmup_steps > 0 else cfg.learning_rate))
    return optax.chain(*parts)


def build_model(config: Config, image_shape):
    """(module, apply_fn) where apply_fn(params, x, t, y) -> velocity, eval mode."""
    module = unet.UNet(config.net, out_channels=image_shape[-1])
    conditional = config.net.num_classes > 0

    def apply_fn(params, x, t, y=None):
        return module.apply(params, x, t, y if conditional else None)

    return module, apply_fn


def init_state(config: Config, image_shape, key) -> TrainState:
    """Fresh TrainState (params, EMA copy, optimizer state) for `image_shape` (H, W, C)."""
    _, params = unet.create(config.net, tuple(image_shape), key)
    return _state_from_params(params, config)


def abstract_state(config: Config, image_shape) -> TrainState:
    """The TrainState's shapes and dtypes (nothing computed): the target for restores."""
    params = unet.abstract_params(config.net, tuple(image_shape))
    return jax.eval_shape(lambda p: _state_from_params(p, config), params)


def _state_from_params(params, config: Config) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=make_optimizer(config.train).init(params))


class StepNoise(NamedTuple):
    """All the randomness of one step for a batch of N images (None: not drawn)."""

    hflip: Any  # bool [N,1,1,1] or None
    vflip: Any  # bool [N,1,1,1] or None
    corners: Any  # int [N,2] patch corners or None
    t: Any  # float [N] path times
    eps: Any  # float32 [N,h,w,C] noise (h, w: the patch size when cropping)
    dropout_key: Any  # key for the network's dropout (masks over the whole batch)


def draw_augment(key, images_shape, cfg: TrainConfig):
    """(hflip, vflip, corners) for a batch of `images_shape` (N,H,W,C); None when off."""
    n, h, w, _ = images_shape
    kh, kv, kc = jax.random.split(key, 3)
    hflip = jax.random.bernoulli(kh, 0.5, (n, 1, 1, 1)) if cfg.hflip else None
    vflip = jax.random.bernoulli(kv, 0.5, (n, 1, 1, 1)) if cfg.vflip else None
    corners = None
    if cfg.patch_size:
        p = cfg.patch_size
        corners = jax.random.randint(kc, (n, 2), 0, jnp.array([h - p + 1, w - p + 1]))
    return hflip, vflip, corners


def apply_augment(images, hflip, vflip, corners, cfg: TrainConfig):
    """Flips and patch crops of images [N,H,W,C] as drawn (`draw_augment`)."""
    if hflip is not None:
        images = jnp.where(hflip, images[:, :, ::-1], images)
    if vflip is not None:
        images = jnp.where(vflip, images[:, ::-1], images)
    if corners is not None:
        c = images.shape[-1]
        p = cfg.patch_size
        crop = lambda img, yx: jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (p, p, c))
        images = jax.vmap(crop)(images, corners)
    return images


def augment(images, key, cfg: TrainConfig):
    """Random flips of images [N,H,W,C] (per image, from `key`), then a random
    patch_size crop per image when cfg.patch_size > 0 -> [N,P,P,C]."""
    return apply_augment(images, *draw_augment(key, images.shape, cfg), cfg)


def draw_step_noise(key, images_shape, cfg: TrainConfig) -> StepNoise:
    """The step's randomness for a batch of `images_shape` (N,H,W,C) from the step key
    fold_in(run key, step). Data-parallel steps draw it for the global batch and keep
    their rows (fmjax/parallel.py), so every layout computes the same step."""
    key_aug, key_loss, key_drop = jax.random.split(key, 3)
    n, h, w, c = images_shape
    hflip, vflip, corners = draw_augment(key_aug, images_shape, cfg)
    if cfg.patch_size:
        h = w = cfg.patch_size
    key_t, key_eps = jax.random.split(key_loss)
    t = flow.sample_times(key_t, n, cfg.t_sampler, cfg.logit_normal_mean, cfg.logit_normal_std)
    # drawn flat (the same numbers): XLA:CPU's elementwise code is slow on a last axis of few channels
    eps = jax.random.normal(key_eps, (n, h * w * c), jnp.float32).reshape(n, h, w, c)
    return StepNoise(hflip, vflip, corners, t, eps, key_drop)


def flow_loss(params, x, noise: StepNoise, labels, *, module, config: Config):
    """Mean squared velocity error on data x [N,h,w,C] in [-1, 1] with the drawn t and eps."""
    y = labels if config.net.num_classes > 0 else None
    xt = flow.path_point(noise.eps, x, noise.t)
    v = module.apply(params, xt, noise.t, y, train=True, rngs={"dropout": noise.dropout_key})
    return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.target_velocity(noise.eps, x)))


# Leaves under this many elements cross devices packed in one flat vector on CPU. XLA:CPU's
# all-reduce has a cost per operand: the small preset's 200 gradients (794k numbers) summed
# over 2 devices in 3.6-8.3 ms as a tree and in 1.5-1.8 ms as one vector. Packing costs
# compile time, as each leaf sliced out of the vector gets kernels of its own: small
# preset's step 12.4 -> 16.7 s and 1.1 -> 1.8 GB peak RSS, paper preset's 58 -> 79 s and
# 4.0 -> 5.0 GB. Only XLA:CPU was measured, so other backends all-reduce the tree.
PACKED_LEAF_SIZE = 65536


def psum_packed(tree, axis_name: str, max_leaf_size: int = PACKED_LEAF_SIZE):
    """`lax.psum(tree, axis_name)`, with the leaves under `max_leaf_size` elements
    concatenated (one vector per dtype) for the all-reduce and split after it."""
    leaves, treedef = jax.tree.flatten(tree)
    small = [i for i, leaf in enumerate(leaves) if jnp.size(leaf) < max_leaf_size]
    large = [i for i in range(len(leaves)) if i not in small]
    summed = dict(zip(large, jax.lax.psum([leaves[i] for i in large], axis_name)))
    for dtype in {jnp.result_type(leaves[i]) for i in small}:
        group = [i for i in small if jnp.result_type(leaves[i]) == dtype]
        packed = jax.lax.psum(jnp.concatenate([jnp.ravel(leaves[i]) for i in group]), axis_name)
        offsets = np.cumsum([0] + [jnp.size(leaves[i]) for i in group])
        for i, start, stop in zip(group, offsets[:-1], offsets[1:]):
            summed[i] = packed[start:stop].reshape(jnp.shape(leaves[i]))
    return jax.tree.unflatten(treedef, [summed[i] for i in range(len(leaves))])


def packs_gradients(devices) -> bool:
    """Whether a data-parallel step over `devices` packs small gradients (on CPU)."""
    return all(d.platform == "cpu" for d in devices)


def shard_loss_and_grads(params, x, noise: StepNoise, labels, *, module, config: Config, axis_name: str,
                         pack: bool):
    """(loss, grads) of `flow_loss` over the global batch, computed by one of the devices
    of `axis_name` (inside shard_map or pmap) from its rows x [N/n,h,w,C] and their draws.
    Each device differentiates its shard's loss / n and the results are summed over the
    devices, small leaves packed when `pack` (`psum_packed`); dropout applies the global
    batch's masks (`global_dropout`)."""
    num_shards = jax.lax.axis_size(axis_name)

    def loss_fn(p):
        with global_dropout(jax.lax.axis_index(axis_name), num_shards):
            return flow_loss(p, x, noise, labels, module=module, config=config) / num_shards

    return psum_packed(jax.value_and_grad(loss_fn)(params), axis_name, PACKED_LEAF_SIZE if pack else 0)


def batch_loss_and_grads(params, x, noise: StepNoise, labels, *, module, config: Config, mesh=None):
    """(loss, grads) of `flow_loss` over the batch x [N,h,w,C]. With a `mesh` of several
    devices on its `data` axis, each device works on its rows (`shard_loss_and_grads`)
    rather than leaving the split to jit, which gives every gradient its own all-reduce
    operand."""
    if mesh is None or mesh.size == 1:
        return jax.value_and_grad(flow_loss)(params, x, noise, labels, module=module, config=config)
    pack = packs_gradients(mesh.devices.flat)
    local = lambda p, x, t, eps, y, key: shard_loss_and_grads(
        p, x, StepNoise(None, None, None, t, eps, key), y, module=module, config=config, axis_name="data",
        pack=pack)
    rows = P("data")
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, rows, rows, P()), out_specs=(P(), P()),
                         check_vma=False)(params, x, noise.t, noise.eps, labels, noise.dropout_key)


def apply_gradients(state: TrainState, grads, cfg: TrainConfig) -> TrainState:
    """The optimizer update and the EMA (with warm-up: early steps average fewer steps)."""
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def train_step(state: TrainState, images_u8, labels, run_key, *, module, config: Config, mesh=None):
    """One optimizer step. images_u8: uint8 [B,H,W,C]; labels: int [B]; `mesh`: the data
    mesh the batch is split over, if any (`batch_loss_and_grads`). Pure."""
    cfg = config.train
    noise = draw_step_noise(jax.random.fold_in(run_key, state.step), images_u8.shape, cfg)
    with jax.named_scope("augment"):
        x = flow.to_model_range(apply_augment(images_u8, noise.hflip, noise.vflip, noise.corners, cfg))
    with jax.named_scope("grad"):
        loss, grads = batch_loss_and_grads(state.params, x, noise, labels, module=module, config=config, mesh=mesh)
    with jax.named_scope("update"):
        state = apply_gradients(state, grads, cfg)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def data_mesh(devices=None):
    """1-D mesh named `data` over `devices` (default: all local devices)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(np.array(devices), ("data",))


def make_step_fn(module, config: Config, mesh):
    """jit(train_step) with the state replicated and the batch split over `data`; donates state."""
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    step = lambda state, images, labels, key: train_step(state, images, labels, key, module=module, config=config,
                                                         mesh=mesh)
    return xla_options.jit(step, in_shardings=(replicated, batch, batch, replicated),
                           out_shardings=(replicated, replicated), donate_argnums=0)


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the batch for `step`: epoch-wise permutations that depend on (seed, epoch) only."""
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // num_items
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % num_items]
    return out


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_manager(run_dir: str, config: Config | None = None) -> ocp.CheckpointManager:
    keep = config.train.keep_checkpoints if config is not None else None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options)


def _state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "ema_params": state.ema_params,
            "opt_state": state.opt_state}


def restore_state(run_dir: str, config: Config, image_shape, step: int | None = None) -> TrainState:
    """Restores the latest (or given) checkpoint into the shapes `config` implies."""
    manager = checkpoint_manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')}: train first")
    # restore onto this process's devices, whatever topology wrote the checkpoint
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_state(config, image_shape))
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(_state_dict(abstract)))
    except (ValueError, KeyError) as err:
        raise TrainError(f"checkpoint in {run_dir} does not match its config.json "
                         f"(was it written by another config?): {str(err).splitlines()[0]}") from None
    return TrainState(**restored)


# ----------------------------------------------------------------------------- loop

def write_json_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train(config: Config, images: np.ndarray, run_dir: str, labels: np.ndarray | None = None,
          resume: bool = False, progress: bool = True, devices=None, stop_at: int | None = None,
          use_pmap: bool = False) -> TrainState:
    """Trains the velocity network on normal images uint8 [N,H,W,C]; returns the final state.

    Writes RUN/config.json, RUN/train_log.jsonl and orbax checkpoints under RUN/checkpoints.
    `stop_at` ends early after that step (the run can be resumed); used to test resume.
    `use_pmap` runs the pmap step (fmjax/parallel.py) instead of the mesh step: same result.
    On several processes (after `parallel.maybe_initialize_distributed()`) every process
    runs this with the same arguments over all devices; each reads its rows of every batch
    and only process 0 writes config.json, the log and the progress bar.
    """
    from fmjax import parallel  # late import: parallel imports this module

    cfg = config.train
    multi_process = jax.process_count() > 1
    if multi_process and devices is not None:
        raise ConfigError("devices cannot be chosen in a multi-process run: it uses every device")
    mesh = parallel.global_mesh() if multi_process else data_mesh(devices)
    writer = parallel.is_writer()
    num_devices = mesh.devices.size
    if cfg.batch_size % num_devices:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {num_devices} devices; "
                          f"set train.batch_size to a multiple of {num_devices}")
    if len(images) == 0:
        raise ConfigError("no training images")
    image_shape = images.shape[1:]
    labels = np.zeros(len(images), np.int32) if labels is None else np.asarray(labels, np.int32)
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    manager = checkpoint_manager(run_dir, config)
    if resume and manager.latest_step() is not None:
        if not os.path.exists(config_path) or Config.from_json(open(config_path).read()) != config:
            raise TrainError(f"--resume: {config_path} differs from this run's config; "
                             f"resume with the same preset and --set overrides, or use a new --out")
        state = restore_state(run_dir, config, image_shape)
    else:
        if manager.latest_step() is not None:
            raise TrainError(f"{run_dir} already holds checkpoints: pass --resume to continue or choose a new --out")
        state = init_state(config, image_shape, jax.random.PRNGKey(cfg.seed))
        if writer:
            write_json_atomic(config_path, config.to_json())

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    module = unet.UNet(config.net, out_channels=image_shape[-1])
    run_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    if use_pmap:
        pmap_devices = list(mesh.devices.flat)
        local_devices = [d for d in pmap_devices if d.process_index == jax.process_index()]
        state = parallel.replicate(state, local_devices)
        step_fn = parallel.make_pmap_step_fn(module, config, pmap_devices)
    else:
        state = jax.device_put(state, replicated)
        run_key = jax.device_put(run_key, replicated)
        step_fn = make_step_fn(module, config, mesh)
    current = parallel.unreplicate if use_pmap else (lambda s: s)  # the state as one copy

    start = int(current(state).step)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    log_path = os.path.join(run_dir, "train_log.jsonl")
    if writer and start == 0 and os.path.exists(log_path):
        os.remove(log_path)
    bar = _progress(start, cfg.steps, progress and writer)
    window, window_start = [], time.perf_counter()
    for step in range(start, end):
        idx = parallel.host_batch_indices(step, len(images), cfg.batch_size, cfg.seed)
        if use_pmap:
            n = len(local_devices)
            batch, batch_labels = parallel.shard_batch(images[idx], n), parallel.shard_batch(labels[idx], n)
        elif multi_process:
            batch = parallel.assemble_global_batch(images[idx], mesh)
            batch_labels = parallel.assemble_global_batch(labels[idx], mesh)
        else:
            batch = jax.device_put(images[idx], batch_sharding)
            batch_labels = jax.device_put(labels[idx], batch_sharding)
        state, metrics = step_fn(state, batch, batch_labels, run_key)
        if use_pmap:
            metrics = jax.tree.map(lambda m: m[0], metrics)  # pmean'd: every device holds the same
        window.append(metrics)
        done = step + 1
        # a checkpoint step also logs, so a NaN state is caught before it is saved
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == end:
            values = jax.device_get(window)
            elapsed = time.perf_counter() - window_start
            log_window(values, done, cfg.batch_size, elapsed, log_path if writer else None, bar)
            window, window_start = [], time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == end:
            # every process saves (orbax coordinates the processes and writes once)
            manager.save(done, args=ocp.args.StandardSave(_state_dict(current(state))))
            window_start = time.perf_counter()  # checkpoint time is not training throughput
    manager.wait_until_finished()
    bar.close()
    return current(state)


def log_window(values, step: int, batch_size: int, elapsed: float, log_path, bar, what: str = "loss") -> dict:
    """Averages a window of step metrics, stops on a non-finite loss, appends one JSONL
    line to `log_path` (when given) and updates the progress bar."""
    record = {"step": step,
              "loss": float(np.mean([v["loss"] for v in values])),
              "grad_norm": float(np.mean([v["grad_norm"] for v in values])),
              "images_per_s": len(values) * batch_size / max(elapsed, 1e-9)}
    if not math.isfinite(record["loss"]):
        raise TrainError(f"{what} became {record['loss']} by step {step}; "
                         f"lower train.learning_rate or set train.grad_clip_norm")
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    bar.update(len(values))
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    return record


def _progress(start, total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
