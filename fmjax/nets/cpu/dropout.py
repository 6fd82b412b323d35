"""Dropout whose masks come from a counter-based hash of each element's position.

`nn.Dropout` compares one float32 uniform per element, one 32-bit threefry word (about
20 rounds of add, rotate and xor per pair of words). Here the layer's key gives two
32-bit seeds s0, s1, and an element's random word is
fmix(fmix(i * 0x9E3779B9 + s0) ^ s1) for its flat index i, fmix being MurmurHash3's
32-bit finaliser (multiply, shift, xor). That is a handful of integer operations per
element, and XLA fuses them with the select that applies the mask, so no random array is
written. An element is kept when its word is at least round(rate * 2^32), so the drop
probability is the rate up to 2^-32; kept elements are scaled by 1 / (1 - rate) as in
`nn.Dropout`. The masks differ from `nn.Dropout`'s (docs/performance.md has the timings).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Dropout", "keep_mask"]

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
    applies rows first_row.. of a larger batch's mask (`fmjax.nets.layers.global_dropout`)."""

    draws_rows = True  # global_dropout passes first_row: a shard draws its own rows of the mask

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
