"""Sums over every axis but the channel axis, in the form XLA:CPU runs fast, and the
broadcast whose gradient is that sum.

The gradient of a bias or of a per-(sample, channel) scale is a sum of an NHWC array
over N, H, W or over H, W. XLA:CPU (without YNNPACK) took 12 ms to sum a [32,64,64,32]
float32 array over N, H, W, against 0.6 ms for the same sum taken after a reshape that
puts k rows side by side ([M/k, k*C], then the k partial sums added), one device,
interleaved. `channel_sum` is that reshaped sum; `spread` broadcasts [N, C] to
[N, ..., C] and has it as its gradient.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["channel_sum", "spread"]

# Row width (k * C elements) the partial sums are taken over.
_ROW = 512


def _rows_side_by_side(length: int, channels: int) -> int:
    """The largest k dividing `length` with k * channels <= max(_ROW, channels)."""
    limit = max(1, _ROW // channels)
    return max(d for d in range(1, min(limit, length) + 1) if length % d == 0)


def channel_sum(x, keep_batch: bool = False):
    """Sum of x [N, ..., C] over all axes but the last (and the first with keep_batch).

    Returns [C], or [N, C] with keep_batch.
    """
    c = x.shape[-1]
    lead = x.shape[0] if keep_batch else 1
    length = math.prod(x.shape[:-1]) // lead
    k = _rows_side_by_side(length, c)
    partial = jnp.sum(x.reshape(lead, length // k, k * c), axis=1)
    sums = jnp.sum(partial.reshape(lead, k, c), axis=1)
    return sums if keep_batch else sums[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def spread(v, shape):
    """v [N, C] broadcast to `shape` [N, ..., C]; its gradient is `channel_sum(g, keep_batch=True)`."""
    return jnp.broadcast_to(v.reshape(v.shape[0], *([1] * (len(shape) - 2)), v.shape[-1]), shape)


def _spread_fwd(v, shape):
    return spread(v, shape), None


def _spread_bwd(shape, _, g):
    return (channel_sum(g, keep_batch=True),)


spread.defvjp(_spread_fwd, _spread_bwd)

