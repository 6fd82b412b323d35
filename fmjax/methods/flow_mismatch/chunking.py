"""How many network inputs one scoring call may take: from the compiled program's memory
analysis, within a per-device memory budget."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax import xla_options
from fmjax.errors import ScoreRuleError

__all__ = ["chunk_size_for_budget", "even_chunk", "forward_bytes"]


def forward_bytes(apply_fn, params, image_shape, chunk: int) -> int:
    """Device bytes XLA reserves for one call of apply_fn on `chunk` inputs: temporaries
    plus output, from the compiled program's memory analysis (nothing runs)."""
    x = jax.ShapeDtypeStruct((chunk,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((chunk,), jnp.float32)
    y = jax.ShapeDtypeStruct((chunk,), jnp.int32)
    memory = xla_options.jit(apply_fn).lower(params, x, t, y).compile().memory_analysis()
    if memory is None:
        raise ScoreRuleError(f"the {jax.default_backend()} backend reports no memory analysis; set score.chunk_size")
    return int(memory.temp_size_in_bytes + memory.output_size_in_bytes)


def even_chunk(inputs: int, max_chunk: int) -> int:
    """The smallest chunk that covers `inputs` network inputs in as few calls as chunks of
    `max_chunk` do: padding then wastes less than one input per call (480 inputs at most
    236 per call: 3 calls of 160, not 3 of 236 with 228 padded)."""
    calls = -(-inputs // max_chunk)
    return -(-inputs // calls)


def chunk_size_for_budget(apply_fn, params, image_shape, budget_bytes: int, max_chunk: int,
                          fixed_bytes: int = 0, probe: int = 4, max_compiles: int = 8) -> int:
    """The largest chunk (network inputs per call, <= max_chunk) whose call fits in
    `budget_bytes` of one device beside the params and `fixed_bytes` (the stored mismatch).

    Every candidate is checked with its compiled memory analysis (`forward_bytes`), so the
    chunk returned fits. Candidates come from a line through the two largest chunks
    compiled so far (first 1 and `probe` inputs), kept between the largest chunk known to
    fit and the smallest known not to. Memory is close to affine in the chunk, but not at
    small chunks: the paper preset at 256x256 reserved 380 MB for 1 input, 495 MB for 4
    and 4,217 MB for 36, the chunk a line through 1 and 4 picks for the 1,755 MB of room
    the default budget leaves (this search picks 14: 1,732 MB). At most `max_compiles`
    programs are compiled; the search then returns the largest chunk known to fit.
    Raises ScoreRuleError when not even one input fits.
    """
    params_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    room = budget_bytes - params_bytes - fixed_bytes
    known = {1: forward_bytes(apply_fn, params, image_shape, 1)}
    if known[1] > room:
        need = (params_bytes + fixed_bytes + known[1]) / 2 ** 20
        raise ScoreRuleError(f"score.memory_budget_mb = {budget_bytes / 2 ** 20:.0f} is below one network call "
                             f"({need:.0f} MB with params and stored mismatch); raise it or set score.chunk_size")
    candidate = min(probe, max_chunk)
    while candidate not in known and len(known) < max_compiles:
        known[candidate] = forward_bytes(apply_fn, params, image_shape, candidate)
        fits = max(c for c, b in known.items() if b <= room)
        over = min((c for c, b in known.items() if b > room), default=max_chunk + 1)
        if fits == max_chunk or over == fits + 1:
            break
        (c1, b1), (c2, b2) = sorted(known.items())[-2:]
        per_input = max((b2 - b1) / (c2 - c1), 1.0)
        candidate = min(max(int(c2 + (room - b2) // per_input), fits + 1), over - 1)
    return max(c for c, b in known.items() if b <= room)
