"""One optimizer step for any training objective, on one device, over a data mesh, or
under `jax.pmap`: the same pure per-device loss and gradient function in every layout.

An `Objective` says what a method trains: `draw(key, shape)` draws the per-example
randomness of a batch of model inputs (flow matching: times t and noise eps; DDPM: an
integer timestep and eps), and `loss(params, x, noise, class_ids, apply_train)` is the
batch's mean loss. The step draws everything random for the GLOBAL batch from
fold_in(run key, step): flips and patch crops, the objective's draws and the dropout key.
Every layout then works on its rows of those draws, each device differentiates its
shard's loss / n, and the n gradients are summed (`psum_packed`); dropout applies the
global batch's masks (`global_dropout`). So the mesh path, the pmap path and one device
compute the same step up to the order of floating-point sums.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from fmjax import xla_options
from fmjax.config import Config
from fmjax.distributed.collectives import PACKED_LEAF_SIZE, packs_gradients, psum_packed
from fmjax.distributed.mesh import DATA_AXIS, process_major_devices, replicated, rows
from fmjax.flow import to_model_range
from fmjax.nets.layers import global_dropout
from fmjax.training.state import TrainState, apply_gradients

__all__ = ["Augment", "Objective", "StepDraws", "apply_augment", "augment", "draw_augment", "draw_step",
           "heldout_loss", "make_heldout_loss_fn", "make_pmap_step_fn", "make_step_fn", "pmap_train_step", "shard_loss_and_grads", "slice_draws",
           "train_step"]


class Augment(NamedTuple):
    """Random flips, and a random square crop of side patch_size (0: none), per image."""

    hflip: bool = False
    vflip: bool = False
    patch_size: int = 0


def default_seed_keys(seed: int):
    """(init key, run key) of a run's seed: params from PRNGKey(seed), steps from
    fold_in(PRNGKey(seed), 1)."""
    key = jax.random.PRNGKey(seed)
    return key, jax.random.fold_in(key, 1)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a method trains.

    draw(key, shape) -> pytree of per-example arrays [N, ...] for model inputs of
      `shape` (N, h, w, C) (h, w: the crop when augment.patch_size > 0);
    loss(params, x, noise, class_ids, apply_train) -> scalar: x float32 [N,h,w,C] in
      [-1, 1], noise as drawn, class_ids int [N], apply_train(params, x, t, y) the network
      in training mode (dropout on);
    augment: the flips and crop of the step;
    seed_keys(seed) -> (init key, run key).
    """

    draw: Callable
    loss: Callable
    augment: Augment = Augment()
    seed_keys: Callable = default_seed_keys


class StepDraws(NamedTuple):
    """All the randomness of one step for a batch of N images (None: not drawn)."""

    hflip: Any  # bool [N,1,1,1] or None
    vflip: Any  # bool [N,1,1,1] or None
    corners: Any  # int [N,2] patch corners or None
    noise: Any  # the objective's draws, arrays [N, ...]
    dropout_key: Any  # key for the network's dropout (masks over the whole batch)


def draw_augment(key, images_shape, aug: Augment):
    """(hflip, vflip, corners) for a batch of `images_shape` (N,H,W,C); None when off."""
    n, h, w, _ = images_shape
    kh, kv, kc = jax.random.split(key, 3)
    hflip = jax.random.bernoulli(kh, 0.5, (n, 1, 1, 1)) if aug.hflip else None
    vflip = jax.random.bernoulli(kv, 0.5, (n, 1, 1, 1)) if aug.vflip else None
    corners = None
    if aug.patch_size:
        p = aug.patch_size
        corners = jax.random.randint(kc, (n, 2), 0, jnp.array([h - p + 1, w - p + 1]))
    return hflip, vflip, corners


def apply_augment(images, hflip, vflip, corners, patch_size: int = 0):
    """Flips and patch crops of images [N,H,W,C] as drawn (`draw_augment`)."""
    if hflip is not None:
        images = jnp.where(hflip, images[:, :, ::-1], images)
    if vflip is not None:
        images = jnp.where(vflip, images[:, ::-1], images)
    if corners is not None:
        c = images.shape[-1]
        crop = lambda img, yx: lax.dynamic_slice(img, (yx[0], yx[1], 0), (patch_size, patch_size, c))
        images = jax.vmap(crop)(images, corners)
    return images


def augment(images, key, aug: Augment):
    """Random flips of images [N,H,W,C] (per image, from `key`), then a random
    patch_size crop per image when aug.patch_size > 0 -> [N,P,P,C]."""
    return apply_augment(images, *draw_augment(key, images.shape, aug), aug.patch_size)


def draw_step(key, images_shape, objective: Objective) -> StepDraws:
    """The step's randomness for a batch of `images_shape` (N,H,W,C) from the step key
    fold_in(run key, step)."""
    key_aug, key_loss, key_drop = jax.random.split(key, 3)
    n, h, w, c = images_shape
    hflip, vflip, corners = draw_augment(key_aug, images_shape, objective.augment)
    if objective.augment.patch_size:
        h = w = objective.augment.patch_size
    return StepDraws(hflip, vflip, corners, objective.draw(key_loss, (n, h, w, c)), key_drop)


def slice_draws(draws: StepDraws, start, size: int) -> StepDraws:
    """Rows [start, start + size) of every per-image draw (`start` may be traced)."""
    take = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, size, 0)
    return StepDraws(take(draws.hflip), take(draws.vflip), take(draws.corners), jax.tree.map(take, draws.noise),
                     draws.dropout_key)


def _loss_fn(objective: Objective, module, conditional: bool, dropout_key):
    """params, x, noise, class_ids -> the objective's loss with the network in training mode."""
    def apply_train(params, x, t, y=None):
        return module.apply(params, x, t, y if conditional else None, train=True, rngs={"dropout": dropout_key})

    return lambda params, x, noise, class_ids: objective.loss(params, x, noise, class_ids, apply_train)


def shard_loss_and_grads(params, x, noise, class_ids, dropout_key, *, objective: Objective, module,
                         conditional: bool, axis_name: str, pack: bool):
    """(loss, grads) over the global batch, computed by one of the devices of `axis_name`
    (inside shard_map or pmap) from its rows x [N/n,h,w,C] and their draws: each device
    differentiates its shard's loss / n and the results are summed over the devices, small
    leaves packed when `pack` (`psum_packed`)."""
    num_shards = lax.axis_size(axis_name)
    loss = _loss_fn(objective, module, conditional, dropout_key)

    def shard_loss(p):
        with global_dropout(lax.axis_index(axis_name), num_shards):
            return loss(p, x, noise, class_ids) / num_shards

    return psum_packed(jax.value_and_grad(shard_loss)(params), axis_name, PACKED_LEAF_SIZE if pack else 0)


def _batch_loss_and_grads(params, x, noise, class_ids, dropout_key, *, objective, module, conditional, mesh=None):
    """(loss, grads) over the batch x [N,h,w,C]. With a `mesh` of several devices, each
    device works on its rows under shard_map (`shard_loss_and_grads`) rather than leaving
    the split to jit, which gives every gradient its own all-reduce operand."""
    if mesh is None or mesh.size == 1:
        loss = _loss_fn(objective, module, conditional, dropout_key)
        return jax.value_and_grad(loss)(params, x, noise, class_ids)
    local = lambda p, x, noise, y, key: shard_loss_and_grads(
        p, x, noise, y, key, objective=objective, module=module, conditional=conditional, axis_name=DATA_AXIS,
        pack=packs_gradients(mesh.devices.flat))
    data = P(DATA_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), data, data, data, P()), out_specs=(P(), P()),
                         check_vma=False)(params, x, noise, class_ids, dropout_key)


def _update(state: TrainState, images_u8, draws: StepDraws, loss_and_grads, config: Config, patch_size: int):
    with jax.named_scope("augment"):
        x = to_model_range(apply_augment(images_u8, draws.hflip, draws.vflip, draws.corners, patch_size))
    with jax.named_scope("grad"):
        loss, grads = loss_and_grads(x)
    with jax.named_scope("update"):
        state = apply_gradients(state, grads, config.train)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def train_step(state: TrainState, images_u8, class_ids, run_key, *, objective: Objective, module,
               config: Config, mesh=None):
    """One optimizer step. images_u8: uint8 [B,H,W,C]; class_ids: int [B]; `mesh`: the data
    mesh the batch is split over, if any. Pure."""
    draws = draw_step(jax.random.fold_in(run_key, state.step), images_u8.shape, objective)
    loss_and_grads = lambda x: _batch_loss_and_grads(
        state.params, x, draws.noise, class_ids, draws.dropout_key, objective=objective, module=module,
        conditional=config.net.num_classes > 0, mesh=mesh)
    return _update(state, images_u8, draws, loss_and_grads, config, objective.augment.patch_size)


def pmap_train_step(state: TrainState, images_u8, class_ids, run_key, *, objective: Objective, module,
                    config: Config, axis_name: str = DATA_AXIS, pack: bool = True):
    """`train_step` for one device's shard under `pmap(axis_name=...)`: the global batch's
    draws sliced to this shard, loss and gradients summed over devices
    (`shard_loss_and_grads`; `pack`: small gradients packed, for CPU devices).
    images_u8: uint8 [B/n,H,W,C] (this device's rows of the global batch, in order)."""
    num_shards = lax.axis_size(axis_name)
    local = images_u8.shape[0]
    global_shape = (local * num_shards,) + tuple(images_u8.shape[1:])
    draws = draw_step(jax.random.fold_in(run_key, state.step), global_shape, objective)
    draws = slice_draws(draws, lax.axis_index(axis_name) * local, local)
    loss_and_grads = lambda x: shard_loss_and_grads(
        state.params, x, draws.noise, class_ids, draws.dropout_key, objective=objective, module=module,
        conditional=config.net.num_classes > 0, axis_name=axis_name, pack=pack)
    return _update(state, images_u8, draws, loss_and_grads, config, objective.augment.patch_size)


def make_step_fn(objective: Objective, module, config: Config, mesh):
    """jit(train_step) with the state replicated and the batch split over the mesh;
    donates the state. Call it as step(state, images, class_ids, run_key)."""
    step = lambda state, images, class_ids, key: train_step(state, images, class_ids, key, objective=objective,
                                                             module=module, config=config, mesh=mesh)
    return xla_options.jit(step, in_shardings=(replicated(mesh), rows(mesh), rows(mesh), replicated(mesh)),
                           out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def make_pmap_step_fn(objective: Objective, module, config: Config, devices=None):
    """pmap(pmap_train_step) over `devices` (default: `process_major_devices()`, i.e. all
    local devices on one host and every device, process by process, on several).

    Call it as step(state, images, class_ids, run_key) with `state` from
    `fmjax.distributed.placement.replicate`, images [n, B/n, H, W, C] and class ids
    [n, B/n] from `shard_batch` (n: this process's devices), and one (unreplicated)
    run_key; returns (state, metrics), both with a leading device axis. The state is
    donated. `jax.pmap` takes no compiler options, so on CPU this path runs without
    `fmjax.xla_options`."""
    devices = process_major_devices() if devices is None else list(devices)
    step = lambda state, images, class_ids, key: pmap_train_step(
        state, images, class_ids, key, objective=objective, module=module, config=config,
        pack=packs_gradients(devices))
    return jax.pmap(step, axis_name=DATA_AXIS, in_axes=(0, 0, 0, None), devices=devices, donate_argnums=0)


def heldout_loss(params, images_u8, class_ids, key, *, objective: Objective, module, config: Config):
    """The objective's mean loss on held-out normal images uint8 [N,H,W,C] (class_ids int
    [N]) with the network in evaluation mode (no dropout), every draw (flips, crops, the
    objective's noise) from `key`: the same key gives the same draws at every evaluation,
    so values along a training run differ only by the parameters. Pure."""
    draws = draw_step(key, images_u8.shape, objective)
    x = to_model_range(apply_augment(images_u8, draws.hflip, draws.vflip, draws.corners, objective.augment.patch_size))
    conditional = config.net.num_classes > 0

    def apply_eval(params, x, t, y=None):
        return module.apply(params, x, t, y if conditional else None, train=False)

    return objective.loss(params, x, draws.noise, class_ids, apply_eval)


def make_heldout_loss_fn(objective: Objective, module, config: Config, limit: int = 256):
    """(params, images uint8 [N,H,W,C], class_ids [N], key) -> float: `heldout_loss` over
    the first min(N, limit) images in batches of train.batch_size (a last partial batch is
    left out unless it is the only one), batch i drawing from fold_in(key, i)."""
    batch_loss = xla_options.jit(lambda p, x, y, k: heldout_loss(p, x, y, k, objective=objective, module=module,
                                                                 config=config))

    def evaluate(params, images_u8, class_ids, key) -> float:
        n = min(len(images_u8), limit)
        size = min(config.train.batch_size, n)
        losses = [batch_loss(params, images_u8[i * size:(i + 1) * size], class_ids[i * size:(i + 1) * size],
                             jax.random.fold_in(key, i)) for i in range(n // size)]
        return float(jnp.mean(jnp.stack(losses)))

    return evaluate

