"""XLA compiler options for fmjax's jitted programs, and `jit`, which applies them.

On XLA:CPU this jaxlib hands convolutions to YNNPACK by default. For the U-Net's 3x3
convolutions XLA's own (Eigen) convolutions were faster, one XLA CPU device, float32
(ms, interleaved in one process):

    batch 32, 64x64x64 -> 64:   forward 100.8 -> 48.0,  kernel gradient 342.6 -> 97.4
    batch 32, 32x32x128 -> 128: forward  50.5 -> 40.6,  kernel gradient 176.7 -> 58.3

so fmjax compiles its programs with convolutions left out of YNNPACK's fusions (its dot,
elementwise and reduce fusions stay). Results are the same up to float32 rounding.

Only the CPU backend is affected. An `xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS
is left to win, so the XLA default stays one flag away:
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution`.
"""
from __future__ import annotations

import os

import jax

__all__ = ["compiler_options", "jit"]

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
_CPU_OPTIONS = {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(backend: str | None = None) -> dict:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's default
    backend): the CPU options above, or {} elsewhere and where XLA_FLAGS sets the same flag."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(_CPU_OPTIONS)


def jit(fn, **kwargs):
    """`jax.jit(fn, **kwargs)` compiled with `compiler_options()`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
