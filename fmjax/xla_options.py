"""XLA compiler options for fmjax's jitted programs, and `jit`, which applies them.

On XLA:CPU this jaxlib hands convolutions, alone or fused with the elementwise work
around them, to YNNPACK by default. For the U-Net, lone 3x3 convolutions ran faster as
XLA's own (Eigen) convolutions, while YNNPACK's dot, elementwise and reduce fusions
helped (docs/performance.md), so on the CPU backend lone convolutions leave YNNPACK.
Results are the same up to float32 rounding. Other backends get no options. An
`xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is left to win, e.g. to bring
YNNPACK convolutions back:
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution`.
"""
from __future__ import annotations

import os

import jax

__all__ = ["compiler_options", "jit"]

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
_FUSIONS = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(backend: str | None = None) -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a program on `backend` (default:
    JAX's default backend): the CPU options above, or {} elsewhere and where XLA_FLAGS
    sets the same flag."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_YNN_FUSIONS: _FUSIONS}


def jit(fn, **kwargs):
    """`jax.jit(fn, **kwargs)` compiled with `compiler_options()`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
