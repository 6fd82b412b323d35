"""RADAR's training objective: an epsilon-predicting DDPM on random patches of normal
images, for the shared training loop."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.methods.radar.settings import SCHEDULES, RadarSettings
from fmjax.training.step import Augment, Objective

__all__ = ["ddpm_betas", "ddpm_objective", "ddpm_schedule", "draw_noise", "eps_loss", "q_sample", "schedule_of",
           "seed_keys"]


def ddpm_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> np.ndarray:
    """betas float64 [num_steps].

    linear: evenly spaced from beta_start to beta_end (Ho et al.).
    cosine: Nichol & Dhariwal, alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) normalised
    to alpha_bar(0) = 1, beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999).
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "cosine":
        f = lambda t: np.cos((t / num_steps + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
        steps = np.arange(num_steps + 1, dtype=np.float64)
        return np.minimum(1.0 - f(steps[1:]) / f(steps[:-1]), 0.999)
    raise ConfigError(f"unknown noise schedule {kind!r} (known: {', '.join(SCHEDULES)})")


def ddpm_schedule(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """alpha_bar float64 [num_steps]: alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1."""
    return np.cumprod(1.0 - ddpm_betas(kind, num_steps, beta_start, beta_end))


def schedule_of(rc: RadarSettings) -> np.ndarray:
    return ddpm_schedule(rc.schedule, rc.num_steps, rc.beta_start, rc.beta_end)


def q_sample(x0, eps, alpha_bar_t):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.  x0, eps: [N,H,W,C]; alpha_bar_t: [N] or scalar."""
    ab = jnp.asarray(alpha_bar_t, jnp.float32)
    ab = jnp.reshape(ab, ab.shape + (1,) * (x0.ndim - ab.ndim))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def draw_noise(key, shape, num_steps: int) -> dict:
    """A training batch's draws for patches of `shape` (N, p, p, C): integer timesteps
    t int32 [N] in 0..num_steps-1 and noise eps float32 [N, p, p, C]."""
    key_t, key_eps = jax.random.split(key)
    n, h, w, c = shape
    t = jax.random.randint(key_t, (n,), 0, num_steps)
    # drawn flat (the same numbers): XLA:CPU's elementwise code is slow on a last axis of few channels
    eps = jax.random.normal(key_eps, (n, h * w * c), jnp.float32).reshape(n, h, w, c)
    return {"t": t, "eps": eps}


def eps_loss(params, x0, noise, class_ids, apply_train, alpha_bar):
    """DDPM epsilon-prediction loss, a scalar: x0 [N,p,p,C] in [-1, 1], noise from
    `draw_noise`, alpha_bar [num_steps]. The network gets t / num_steps (the U-Net scales
    by 1000, so with 1000 steps its sinusoid sees the integer timestep exactly) and no
    class label (RADAR trains an unconditional network)."""
    num_steps = alpha_bar.shape[0]
    t, eps = noise["t"], noise["eps"]
    x_t = q_sample(x0, eps, jnp.asarray(alpha_bar, jnp.float32)[t])
    eps_hat = apply_train(params, x_t, t.astype(jnp.float32) / num_steps, None)
    return jnp.mean(jnp.square(eps_hat.astype(jnp.float32) - eps))


def seed_keys(seed: int):
    """(init key, run key) = split(PRNGKey(seed)): the keys RADAR runs have always used."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, run_key


def ddpm_objective(config) -> Objective:
    """The epsilon objective on random `score.patch_size` crops (plus the config's flips)."""
    rc = config.score
    alpha_bar = np.asarray(schedule_of(rc), np.float32)
    return Objective(draw=functools.partial(draw_noise, num_steps=rc.num_steps),
                     loss=functools.partial(eps_loss, alpha_bar=alpha_bar),
                     augment=Augment(bool(config.train.hflip), bool(config.train.vflip), rc.patch_size),
                     seed_keys=seed_keys)
