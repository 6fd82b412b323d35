"""The U-Net's building blocks as plain Flax layers: nn.GroupNorm, nn.Conv, nn.Dropout and
one-piece softmax attention, which XLA fuses as it sees fit on every backend.

`fmjax/nets/cpu/` holds the same blocks written for XLA:CPU, with the same parameters
and the same results up to float32 rounding; `Kernels` names one set of them, and the
U-Net uses `PLAIN` or `fmjax.nets.cpu.CPU` by `net.kernels`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PLAIN", "Conv", "GroupNorm", "Kernels", "attention", "global_dropout", "num_norm_groups", "torch_init"]

# PyTorch's default conv/linear weight init (kaiming_uniform with a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as used by the reference implementation.
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Same padding as the reference's padding=1 convs, also for stride 2 (pads both sides).
PAD1 = ((1, 1), (1, 1))


def num_norm_groups(num_groups: int, channels: int) -> int:
    """min(num_groups, channels), reduced to a divisor of `channels` if needed."""
    g = max(1, min(num_groups, channels))
    return g if channels % g == 0 else math.gcd(g, channels)


class GroupNorm(nn.Module):
    """nn.GroupNorm (under `norm`) computed in float32 (like the reference's GroupNorm32),
    then an optional per-sample scale-shift (`emb_scale`, `emb_shift` [N, C]:
    h * (1 + scale) + shift) and SiLU, cast back to the input's dtype."""

    num_groups: int
    silu: bool = False

    @nn.compact
    def __call__(self, x, emb_scale=None, emb_shift=None):
        groups = num_norm_groups(self.num_groups, x.shape[-1])
        h = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                         name="norm")(x.astype(jnp.float32))
        if emb_scale is not None:
            per_sample = lambda v: v.astype(jnp.float32)[:, None, None, :]
            h = h * (1.0 + per_sample(emb_scale)) + per_sample(emb_shift)
        return (nn.silu(h) if self.silu else h).astype(x.dtype)


class Conv(nn.Module):
    """nn.Conv written out: square `kernel` 1 or 3 (padding 1), `strides`; parameters
    `kernel` [k,k,C,O] (PyTorch's init, or zeros) and `bias` [O], float32, computed in `dtype`."""

    features: int
    kernel: int
    strides: int = 1
    zero_init: bool = False
    dtype: Any = jnp.float32

    def weights(self, in_channels: int):
        """(kernel [k,k,in_channels,features], bias [features]) in `dtype` (from float32 parameters)."""
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.zeros if self.zero_init else torch_init,
                            (k, k, in_channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel.astype(self.dtype), bias.astype(self.dtype)

    @nn.compact
    def __call__(self, x):
        kernel, bias = self.weights(x.shape[-1])
        y = lax.conv_general_dilated(x.astype(self.dtype), kernel, (self.strides, self.strides),
                                     PAD1 if self.kernel == 3 else ((0, 0), (0, 0)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def attention(q, k, v, scale, train: bool = False):
    """softmax(q k^T * scale) v per head for q, k, v [N, L, heads, d] -> [N, L, heads, d];
    logits and softmax in float32."""
    del train  # one piece in training and inference
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, v)


def _add_per_channel(h, v):
    """h [N, H, W, C] + v [N, C] broadcast over H and W."""
    return h + v[:, None, None, :]


def _as_is(v, *values):
    return (v, *values)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation of the blocks the U-Net is built from.

    group_norm: a GroupNorm module class as above; conv: a Conv module class as above;
    dropout: an nn.Dropout class; attention(q, k, v, scale, train); add_per_channel(h, v);
    scalars(v, *values) -> (v, *values) as the values the attention scale is computed with.
    """

    group_norm: type
    conv: type
    dropout: type
    attention: Callable
    add_per_channel: Callable
    scalars: Callable


PLAIN = Kernels(group_norm=GroupNorm, conv=Conv, dropout=nn.Dropout, attention=attention,
                add_per_channel=_add_per_channel, scalars=_as_is)


def global_dropout(shard_index, num_shards: int):
    """Context manager: every `nn.Dropout` call inside applies the rows of shard
    `shard_index` of the mask the unsharded network draws for the global batch (`num_shards`
    times the local leading axis) with the same key, so a data-parallel step drops what the
    unsharded step drops. A dropout class with `draws_rows = True` (fmjax.nets.cpu's) is
    given the shard's first row and draws those rows only; others draw the global mask and
    slice it. Assumes dropout inputs carry the batch on axis 0 (true of every fmjax network)."""

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
        if getattr(module, "draws_rows", False):
            return next_fun(*args, first_row=shard_index * local, **kwargs)
        # Dropout of ones over the global shape: 1/keep where kept, 0 where dropped
        ones = jnp.ones((local * num_shards,) + inputs.shape[1:], inputs.dtype)
        scaled_mask = next_fun(ones, *rest, **kwargs)
        keep = lax.dynamic_slice_in_dim(scaled_mask, shard_index * local, local, 0) != 0
        return lax.select(keep, inputs / (1.0 - module.rate), jnp.zeros_like(inputs))

    return nn.intercept_methods(interceptor)
