"""Scalars as traced values, for XLA:CPU's YNNPACK fusions.

XLA merges the broadcasts of one constant to one shape into a single array, and where
that array feeds several of XLA:CPU's YNNPACK fusions it is written out in full: the 1.0
of `z / (1.0 + exp(-z))` in every SiLU became an array of ones the size of the
activations. `beside(v, *values)` returns the values as traced scalars of their own (an
optimisation barrier with v keeps XLA from folding them back into constants), which each
fusion broadcasts as it goes (docs/performance.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["beside"]


def beside(v, *values):
    """(v, *values): the values as traced float32 scalars. v is returned unchanged but is
    materialised there (the barrier): pass something small, or an array materialised anyway."""
    v, scalars = jax.lax.optimization_barrier((v, [jnp.asarray(s, jnp.float32) for s in values]))
    return (v, *scalars)
