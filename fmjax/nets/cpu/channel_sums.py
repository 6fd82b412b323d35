"""Sums over every axis but the channel axis, in the form XLA:CPU runs fast, the
broadcast whose gradient is that sum, and the view both use.

The gradient of a bias or of a per-(sample, channel) scale is a sum of an NHWC array
over N, H, W or over H, W. XLA:CPU (without YNNPACK) sums such an array many times
faster after a reshape that puts k rows side by side ([M/k, k*C], then the k partial
sums added). `channel_sum` is that reshaped sum; `spread` broadcasts [N, C] to
[N, ..., C] and has it as its gradient. The same view (`side_by_side`) speeds up
elementwise work on arrays with few channels, where XLA:CPU's YNNPACK elementwise code is
slow on a short last axis (docs/performance.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["channel_sum", "side_by_side", "spread", "wide_channel_sum"]

# Row width (k * C elements) the partial sums are taken over.
_ROW = 512


def _rows_side_by_side(length: int, channels: int) -> int:
    """The largest k dividing `length` with k * channels <= max(_ROW, channels)."""
    limit = max(1, _ROW // channels)
    return max(d for d in range(1, min(limit, length) + 1) if length % d == 0)


def side_by_side(shape, keep_batch: bool = True):
    """(wide, per_channel) for arrays of `shape` [N, ..., C]: wide(x) is the view
    [N, L/k, k*C] of x (L the size of the axes between N and C) with k rows side by side;
    per_channel(v) lays v [N, C] out as [N, 1, k*C], to broadcast against that view.
    Without keep_batch, N joins the rows: [1, N*L/k, k*C] and v [1, C]."""
    c = shape[-1]
    lead = shape[0] if keep_batch else 1
    length = math.prod(shape[:-1]) // lead
    k = _rows_side_by_side(length, c)
    wide = lambda x: x.reshape(lead, length // k, k * c)
    per_channel = lambda v: jnp.tile(v, (1, k)).reshape(lead, 1, k * c)
    return wide, per_channel


def wide_channel_sum(x, channels: int):
    """Per-(lead, channel) sums [N, C] of a `side_by_side` view x [N, L/k, k*C]."""
    return jnp.sum(jnp.sum(x, axis=1).reshape(x.shape[0], -1, channels), axis=1)


def channel_sum(x, keep_batch: bool = False):
    """Sum of x [N, ..., C] over all axes but the last (and the first with keep_batch).

    Returns [C], or [N, C] with keep_batch.
    """
    wide, _ = side_by_side(x.shape, keep_batch)
    sums = wide_channel_sum(wide(x), x.shape[-1])
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

