import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import xla_options
from fmjax.nets.cpu.scalars import beside


def test_beside_gives_traced_scalars_that_yield_the_same_values():
    v = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
    same, one, half = jax.jit(lambda v: beside(v, 1.0, 0.5))(v)
    np.testing.assert_array_equal(same, v)
    assert (float(one), float(half)) == (1.0, 0.5) and one.dtype == jnp.float32


def test_traced_ones_keep_the_unet_gradient_from_writing_out_arrays_of_ones(monkeypatch):
    """The reason for `beside`: with literal 1.0s in GroupNorm's SiLU and its gradient,
    XLA:CPU writes out more activation-sized broadcasts in the U-Net's gradient program."""
    from fmjax.config import preset
    from fmjax.nets import unet
    from fmjax.nets.cpu import group_norm

    module = unet.UNet(dataclasses.replace(preset("small").net, kernels="cpu"), out_channels=3)
    x, t = jnp.ones((8, 32, 32, 3)), jnp.full((8,), 0.5)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t))

    # the optimised program, whatever quicker-compiling flags the test session runs with
    optimised = {**xla_options.compiler_options(), "xla_backend_optimization_level": 3,
                 "xla_cpu_use_fusion_emitters": True, "xla_cpu_use_xnnpack": True}

    def written_broadcasts():
        grad = jax.jit(jax.grad(lambda p, x, t: jnp.sum(module.apply(p, x, t) ** 2)), compiler_options=optimised)
        hlo = grad.lower(params, x, t).compile().as_text()
        return len(re.findall(r"%wrapped_broadcast[\w.]* = f32\[8,\d+,\d+,\d+\]", hlo))

    traced = written_broadcasts()
    monkeypatch.setattr(group_norm, "beside", lambda v, *values: (v, *values))
    literal = written_broadcasts()
    if jax.default_backend() == "cpu" and xla_options.compiler_options():
        assert traced < literal
