"""XLA compiler options for fmjax's jitted programs, and `jit`, which applies them.

On XLA:CPU this jaxlib hands convolutions, alone or fused with the elementwise work
around them, to YNNPACK by default. For the U-Net that is not the fastest choice:

* a lone 3x3 convolution ran faster as XLA's own (Eigen) convolution, one XLA CPU
  device, float32, ms, interleaved in one process:
      batch 32, 64x64x64 -> 64:   forward 100.8 -> 48.0,  kernel gradient 342.6 -> 97.4
      batch 32, 32x32x128 -> 128: forward  50.5 -> 40.6,  kernel gradient 176.7 -> 58.3
* every program (scorers, forward passes, train steps) keeps YNNPACK's dot, elementwise
  and reduce fusions (lone convolutions leave YNNPACK; those fused with elementwise work
  stay): the paper preset's forward at 64x64 ran faster with them (batch 32 on 2
  devices: 2.9-3.2 s against 4.0-4.2 s without YNNPACK); the small preset's train step
  (64x64x3, batch 32, 2 devices, interleaved) took 1.21-1.75 s against 1.42-2.15 s
  without YNNPACK, and the paper preset's at 64x64 11.8-14.3 s against 11.9-12.9 s.

Results are the same up to float32 rounding. Only the CPU backend is affected. An
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
