"""The training state, the optimizer and the update with its EMA."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fmjax.config import Config, TrainConfig
from fmjax.nets import unet

__all__ = ["TrainState", "abstract_state", "apply_gradients", "init_state", "learning_rate", "make_optimizer", "schedule"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate at each update (0-based): linear warm-up from 0 over
    train.warmup_steps, then train.learning_rate (constant) or a cosine decay from it to
    final_lr_fraction * learning_rate at train.steps (cosine)."""
    peak = float(cfg.learning_rate)
    after = optax.constant_schedule(peak)
    if cfg.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(cfg.steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_fraction)
    if cfg.warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), after], [cfg.warmup_steps])


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate `make_optimizer` applies at update `step` (0-based), as a float."""
    return float(schedule(cfg)(step))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the `schedule` (warm-up, then constant or cosine); optional update-RMS
    clipping (StableAdamW-style)."""
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))
    if cfg.update_rms_clip:
        # per tensor: update / max(1, RMS(update)), the StableAdamW learning-rate clip
        parts.append(optax.clip_by_block_rms(1.0))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    constant = cfg.warmup_steps <= 0 and cfg.lr_schedule == "constant"  # a float: no step count in the state
    parts.append(optax.scale_by_learning_rate(float(cfg.learning_rate) if constant else schedule(cfg)))
    return optax.chain(*parts)


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


def apply_gradients(state: TrainState, grads, cfg: TrainConfig) -> TrainState:
    """The optimizer update and the EMA (with warm-up: early steps average fewer steps)."""
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
