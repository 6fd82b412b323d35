"""Dropout whose masks come from a counter-based hash of each element's position.

`nn.Dropout` compares one float32 uniform per element, one 32-bit threefry word (about
20 rounds of add, rotate and xor per pair of words). Here the layer's key gives two
32-bit seeds s0, s1, and an element's random word is
fmix(fmix(i * 0x9E3779B9 + s0) ^ s1) for its flat index i, fmix being MurmurHash3's
32-bit finaliser (multiply, shift, xor). That is a handful of integer operations per
element, and XLA fuses them with the select that applies the mask, so no random array is
written. An element is kept when its word is at least round(rate * 2^32), so the drop
probability is the rate up to 2^-32; kept elements are scaled by 1 / (1 - rate) as in
`nn.Dropout`.

Measured (2 XLA CPU devices, [32,64,64,64] float32 batch split over them, dropout
between two SiLUs, fastest of 12 calls in alternating order): forward 21.2 ms against
62.7 ms with the previous masks (16 threefry bits per element), 10.3 ms without dropout;
gradient 50.9 ms against 88.7 ms (16.8 ms without). The paper preset's train step (64x64,
batch 32, 2 devices, 6 steps each in alternation): 8.14 s against 9.42 s (medians 9.00 s
and 9.88 s).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Dropout", "global_dropout", "keep_mask"]

_WEYL = 0x9E3779B9  # odd: the index times it visits every 32-bit word once


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser (a bijection of uint32 with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _flat_index(shape):
    """uint32 [*shape]: each element's row-major flat index (mod 2^32), built from
    per-axis iotas so a batch split over devices computes only its own rows."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return index


def keep_mask(key, shape, rate: float, first_row=0):
    """bool [*shape]: True with probability 1 - rate (up to 2^-32), independently per
    element; the same key and shape give the same mask. With `first_row` r (an int or a
    traced int), the mask is rows r .. r + shape[0] - 1 of the mask of any larger batch
    with the same key: a device holding part of a batch draws its own rows alone.
    (Flat indices are taken mod 2^32: more than 2^32 elements repeat the mask.)"""
    shape = tuple(shape)
    row_size = math.prod(shape[1:]) % (1 << 32)
    index = _flat_index(shape) + jnp.asarray(first_row).astype(jnp.uint32) * jnp.uint32(row_size)
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    words = _fmix32(_fmix32(index * jnp.uint32(_WEYL) + seeds[0]) ^ seeds[1])
    return words >= jnp.uint32(min(round(rate * 2.0 ** 32), (1 << 32) - 1))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same fields, same call) with masks from `keep_mask`; `first_row`
    applies rows first_row.. of a larger batch's mask (`global_dropout`)."""

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None, first_row=0):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if self.broadcast_dims:
            raise ValueError("fmjax Dropout draws a mask per element: broadcast_dims is not supported")
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        keep = keep_mask(rng, inputs.shape, self.rate, first_row)
        return lax.select(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))


def global_dropout(shard_index, num_shards: int):
    """Context manager: every `nn.Dropout` call inside applies the rows of shard
    `shard_index` of the mask the unsharded network draws for the global batch (`num_shards`
    times the local leading axis) with the same key, so a data-parallel step drops what the
    unsharded step drops. fmjax's `Dropout` draws only those rows (its masks hash global
    positions); other `nn.Dropout`s draw the global mask and slice it. Assumes dropout
    inputs carry the batch on axis 0 (true of every fmjax network)."""

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
        if isinstance(module, Dropout):
            # fmjax's masks hash each element's global position: draw this shard's rows only
            return next_fun(*args, first_row=shard_index * local, **kwargs)
        # Dropout of ones over the global shape: 1/keep where kept, 0 where dropped
        ones = jnp.ones((local * num_shards,) + inputs.shape[1:], inputs.dtype)
        scaled_mask = next_fun(ones, *rest, **kwargs)
        keep = lax.dynamic_slice_in_dim(scaled_mask, shard_index * local, local, 0) != 0
        return lax.select(keep, inputs / (1.0 - module.rate), jnp.zeros_like(inputs))

    return nn.intercept_methods(interceptor)
