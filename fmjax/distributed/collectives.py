"""Sums over the data axis with fewer, larger operands."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PACKED_LEAF_SIZE", "packs_gradients", "psum_packed"]

# Leaves under this many elements cross devices packed in one flat vector on CPU, where
# XLA's all-reduce has a cost per operand; packing costs compile time, and only XLA:CPU
# was measured, so other backends all-reduce the tree (docs/performance.md).
PACKED_LEAF_SIZE = 65536


def psum_packed(tree, axis_name: str, max_leaf_size: int = PACKED_LEAF_SIZE):
    """`lax.psum(tree, axis_name)`, with the leaves under `max_leaf_size` elements
    concatenated (one vector per dtype) for the all-reduce and split after it."""
    leaves, treedef = jax.tree.flatten(tree)
    small = [i for i, leaf in enumerate(leaves) if jnp.size(leaf) < max_leaf_size]
    large = [i for i in range(len(leaves)) if i not in small]
    summed = dict(zip(large, jax.lax.psum([leaves[i] for i in large], axis_name)))
    for dtype in {jnp.result_type(leaves[i]) for i in small}:
        group = [i for i in small if jnp.result_type(leaves[i]) == dtype]
        packed = jax.lax.psum(jnp.concatenate([jnp.ravel(leaves[i]) for i in group]), axis_name)
        offsets = np.cumsum([0] + [jnp.size(leaves[i]) for i in group])
        for i, start, stop in zip(group, offsets[:-1], offsets[1:]):
            summed[i] = packed[start:stop].reshape(jnp.shape(leaves[i]))
    return jax.tree.unflatten(treedef, [summed[i] for i in range(len(leaves))])


def packs_gradients(devices) -> bool:
    """Whether a data-parallel step over `devices` packs small gradients (on CPU)."""
    return all(d.platform == "cpu" for d in devices)
