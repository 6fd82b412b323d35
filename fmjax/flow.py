"""Affine probability path, flow-matching training draws and loss, time samplers and ODE
integrators.

Convention (docs/method.md, section 1): t = 0 is noise, t = 1 is data,
x_t = (1 - t) * eps + t * x, target velocity u = x - eps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["draw_noise", "integrate", "loss", "path_point", "sample_times", "target_velocity", "to_model_range"]


def to_model_range(images):
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _bcast(t, x):
    """Reshapes t [N] to broadcast against x [N, ...]."""
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def path_point(eps, x, t):
    """x_t = (1 - t) eps + t x.  eps, x: [N, H, W, C]; t: [N] in [0, 1]."""
    t = _bcast(t, x)
    return (1.0 - t) * eps + t * x


def target_velocity(eps, x):
    """Geometric velocity of the straight path from eps to x: u = x - eps."""
    return x - eps


def sample_times(key, n: int, sampler: str = "uniform", mean: float = 0.0, std: float = 1.0):
    """t [n] in (0, 1): `uniform` or `logit_normal` (sigmoid of N(mean, std^2))."""
    if sampler == "uniform":
        return jax.random.uniform(key, (n,))
    if sampler == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
    raise ValueError(f"unknown t sampler {sampler!r} (known: uniform, logit_normal)")


def draw_noise(key, shape, sampler: str = "uniform", mean: float = 0.0, std: float = 1.0) -> dict:
    """A training batch's draws for model inputs of `shape` (N, H, W, C): times
    t float32 [N] and noise eps float32 [N, H, W, C]."""
    key_t, key_eps = jax.random.split(key)
    n, h, w, c = shape
    t = sample_times(key_t, n, sampler, mean, std)
    # drawn flat (the same numbers): XLA:CPU's elementwise code is slow on a last axis of few channels
    eps = jax.random.normal(key_eps, (n, h * w * c), jnp.float32).reshape(n, h, w, c)
    return {"t": t, "eps": eps}


def loss(params, x, noise, class_ids, apply_train):
    """Mean squared velocity error on data x [N,H,W,C] in [-1, 1] with the drawn t and eps.
    apply_train(params, x_t, t, y) -> v [N,H,W,C]."""
    xt = path_point(noise["eps"], x, noise["t"])
    v = apply_train(params, xt, noise["t"], class_ids)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - target_velocity(noise["eps"], x)))


def integrate(velocity_fn, x0, t0: float, t1: float = 1.0, steps: int = 10, method: str = "euler"):
    """Integrates dx/dt = v(x, t) from t0 to t1 with fixed steps (Euler or Heun).

    velocity_fn(x [N,...], t [N]) -> [N,...].  Returns x at t1.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown integrator {method!r} (known: euler, heun)")
    n = x0.shape[0]
    dt = (t1 - t0) / steps

    def step(x, i):
        t = jnp.full((n,), t0 + i * dt, x.dtype)
        v = velocity_fn(x, t)
        if method == "euler":
            return x + dt * v, None
        x_pred = x + dt * v
        v_next = velocity_fn(x_pred, t + dt)
        return x + 0.5 * dt * (v + v_next), None

    x, _ = jax.lax.scan(step, x0, jnp.arange(steps))
    return x
