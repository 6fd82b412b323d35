"""Dropout whose masks cost half the random bits of `flax.linen.Dropout`.

`nn.Dropout` compares one float32 uniform, i.e. one 32-bit threefry word, per element.
Here every 32-bit word gives the masks of two neighbouring channels (its two 16-bit
halves), so threefry runs on half as many counters. An element is kept when its 16 bits
are at least round(rate * 65536): the drop probability is the rate rounded to a multiple
of 1/65536 (0.05 -> 0.0500031), and kept elements are scaled by 1 / (1 - rate) as in
`nn.Dropout`. Inputs with an odd number of channels draw one word per element.

Masks of a [32,64,64,64] float32 batch on 2 XLA CPU devices, fastest of 7 calls,
interleaved: 57 ms against 101 ms with one word per element. The paper preset's forward
pass in training mode (64x64, batch 32, 2 devices, 12 calls in alternating order):
2.58 s against 2.98 s with `nn.Dropout` (medians 3.15 s and 3.70 s), and 2.33 s (2.67 s)
without dropout.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Dropout", "keep_mask"]

_LEVELS = 1 << 16


def keep_mask(key, shape, rate: float):
    """bool [*shape]: True with probability 1 - rate (rate rounded to a multiple of 1/65536)."""
    threshold = round(rate * _LEVELS)
    if shape[-1] % 2:
        return jax.random.randint(key, shape, 0, _LEVELS) >= threshold
    words = jax.random.bits(key, tuple(shape[:-1]) + (shape[-1] // 2,), jnp.uint32)
    halves = lax.bitcast_convert_type(words, jnp.uint16).reshape(shape)
    return halves >= jnp.uint16(threshold)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same fields, same call) with masks from `keep_mask`."""

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if self.broadcast_dims:
            raise ValueError("fmjax Dropout draws a mask per element: broadcast_dims is not supported")
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        keep = keep_mask(rng, inputs.shape, self.rate)
        return lax.select(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
