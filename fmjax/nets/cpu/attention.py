"""Multi-head softmax attention computed in blocks of queries.

The one-piece form writes the logits and the softmax weights of all queries,
[N, heads, L, L] float32, between the first matmul, the softmax passes and the second
matmul: too large for the CPU's cache at the small preset's attention (8 MB at 64x64).
`attention` takes the queries in blocks whose logits stay near `LOGITS_BLOCK` elements
(1 MB in float32), so each block's softmax runs in cache; the result is the one-piece
form's up to float32 rounding (the softmax of a row never mixes rows). It sped up
inference on XLA:CPU; a train step ran faster in one piece (docs/performance.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["LOGITS_BLOCK", "MAX_BLOCKS", "attention", "query_blocks"]

LOGITS_BLOCK = 1 << 18  # logits elements per block of queries
MAX_BLOCKS = 16  # the blocks are unrolled in the program: bounds its size


def query_blocks(batch: int, heads: int, length: int) -> int:
    """How many equal blocks the `length` queries are split into: the fewest (a divisor of
    `length`, at most MAX_BLOCKS) whose logits [batch, heads, length / blocks, length]
    hold at most LOGITS_BLOCK elements, else the largest such divisor."""
    needed = -(-batch * heads * length * length // LOGITS_BLOCK)
    divisors = [b for b in range(1, min(MAX_BLOCKS, length) + 1) if length % b == 0]
    return next((b for b in divisors if b >= needed), divisors[-1])


def _attend(q, k, v, scale):
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, v)


def attention(q, k, v, scale, blocks: int | None = None):
    """softmax(q k^T * scale) v per head for q, k, v [N, L, heads, d] -> [N, L, heads, d];
    logits and softmax in float32, `scale` a scalar (traced or not). The queries are taken
    in `blocks` equal blocks (a divisor of L; default `query_blocks`)."""
    n, length, heads, _ = q.shape
    blocks = query_blocks(n, heads, length) if blocks is None else blocks
    if length % blocks:
        raise ValueError(f"attention: {blocks} blocks do not divide {length} queries")
    if blocks == 1:
        return _attend(q, k, v, scale)
    size = length // blocks
    return jnp.concatenate([_attend(q[:, i:i + size], k, v, scale) for i in range(0, length, size)], axis=1)
