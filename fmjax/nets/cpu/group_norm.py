"""GroupNorm with a per-(sample, channel) affine map and an optional SiLU, as one
function with a hand-written gradient.

Every GroupNorm of the U-Net is followed by an affine map (its own scale and bias, and
in a ResBlock's scale-shift norm the time embedding's scale and shift as well) and
mostly by a SiLU. `group_norm` computes

    y = silu?(xhat * scale + shift),   xhat = (x - mean) * rsqrt(var + eps)

with mean and var per sample and channel group, scale and shift [N, C]. The forward pass
folds the statistics into one multiply-add per element; the backward pass is the
textbook one (two per-(sample, channel) sums, then the input gradient) instead of the
autodiff of three separate operations. On XLA:CPU this made the paper preset's train
step about 20% faster (docs/performance.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fmjax.nets.cpu.channel_sums import channel_sum, side_by_side, spread, wide_channel_sum
from fmjax.nets.cpu.scalars import beside

__all__ = ["group_norm"]


def _group_mean(sums, x_shape, groups: int):
    """Per-(sample, channel) sums [N, C] over the spatial axes of an x of `x_shape` ->
    the means over each group's elements, [N, G]."""
    n, c = sums.shape
    return jnp.sum(sums.reshape(n, groups, c // groups), -1) / (math.prod(x_shape[1:-1]) * (c // groups))


def _statistics(x, groups: int, eps: float):
    """Mean and rsqrt(var + eps) of x [N, ..., C] per sample and group -> two [N, G]."""
    spatial = tuple(range(1, x.ndim - 1))
    mean = _group_mean(jnp.sum(x, spatial), x.shape, groups)
    var = jnp.maximum(_group_mean(jnp.sum(jnp.square(x), spatial), x.shape, groups) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def _per_channel(v, channels: int):
    """[N, G] -> [N, C], each group's value repeated over its channels."""
    return jnp.repeat(v, channels // v.shape[1], axis=1)


def _silu(z, one):
    """silu(z) with the traced 1.0 `one` (fmjax/nets/cpu/scalars.py)."""
    return z / (one + jnp.exp(-z))


def _silu_slope(z, one):
    """The derivative of silu(z) = z * sigmoid(z): sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    s = one / (one + jnp.exp(-z))
    return s * (one + z * (one - s))


def group_norm(x, scale, shift, groups: int, silu: bool = False, eps: float = 1e-5):
    """silu?(GroupNorm(x) * scale + shift) for float32 x [N, ..., C] in `groups` groups of
    channels, scale and shift float32 [N, C] -> [N, ..., C]. The statistics are
    nn.GroupNorm's (fast variance E[x^2] - E[x]^2, floored at 0)."""
    return _group_norm(*_varying_alike(x, scale, shift), groups, silu, eps)


def _varying_alike(*arrays):
    """Inside shard_map, the arrays cast to vary over the union of their mesh axes (a
    hand-written gradient must vary over the same axes as its input: scale and shift
    built from replicated parameters do not, x does). Elsewhere unchanged."""
    varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    axes = frozenset().union(*varying)
    return tuple(jax.lax.pcast(a, tuple(sorted(axes - v)), to="varying") if axes - v else a
                 for a, v in zip(arrays, varying))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, shift, groups, silu, eps):
    return _forward(x, scale, shift, groups, silu, eps)[0]


def _forward(x, scale, shift, groups, silu, eps):
    mean, inv = _statistics(x, groups, eps)
    c = x.shape[-1]
    scale, one = beside(scale, 1.0)
    # the same multiply-add as the normalised form, with the statistics folded into it
    a = _per_channel(inv, c) * scale
    z = x * spread(a, x.shape) + spread(shift - _per_channel(mean, c) * a, x.shape)
    y = _silu(z, one) if silu else z
    return y, (x, scale, shift, mean, inv)


def _backward_layout(shape):
    """(view, per_channel, channel_sums) for the backward pass's elementwise work on arrays
    of `shape` [N, ..., C]: the `side_by_side` view (fmjax/nets/cpu/channel_sums.py) where
    C is not a multiple of 32, where it was faster; otherwise the arrays as they are, as
    the view was up to 2x slower at 256 channels (docs/performance.md)."""
    c = shape[-1]
    if c % 32:
        wide, per_channel = side_by_side(shape)
        return wide, per_channel, lambda a: wide_channel_sum(a, c)
    return (lambda a: a), (lambda v: spread(v, shape)), (lambda a: channel_sum(a, keep_batch=True))


def _backward(groups, silu, eps, residuals, g):
    x, scale, shift, mean, inv = residuals
    shape, c = x.shape, x.shape[-1]
    view, per_channel, channel_sums = _backward_layout(shape)
    x, g = view(x), view(g)
    inv_c = _per_channel(inv, c)
    xhat = (x - per_channel(_per_channel(mean, c))) * per_channel(inv_c)
    if silu:
        scale, one = beside(scale, 1.0)
        g = g * _silu_slope(xhat * per_channel(scale) + per_channel(shift), one)
    d_shift = channel_sums(g)
    d_scale = channel_sums(g * xhat)
    # d loss / d xhat = g * scale; its means over each group, and those of its product with xhat
    mean_g = _per_channel(_group_mean(scale * d_shift, shape, groups), c)
    mean_gx = _per_channel(_group_mean(scale * d_scale, shape, groups), c)
    dx = g * per_channel(scale * inv_c) - per_channel(mean_g * inv_c) - xhat * per_channel(mean_gx * inv_c)
    return dx.reshape(shape), d_scale, d_shift


_group_norm.defvjp(lambda x, scale, shift, groups, silu, eps: _forward(x, scale, shift, groups, silu, eps),
                   _backward)
