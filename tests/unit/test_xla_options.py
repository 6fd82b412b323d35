import jax
import jax.numpy as jnp
import numpy as np

from fmjax import xla_options


def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_cpu_options_leave_convolutions_out_of_ynn_fusions_only_on_cpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = xla_options.compiler_options("cpu")
    fusions = options["xla_cpu_experimental_ynn_fusion_type"].split(",")
    assert "LIBRARY_FUSION_TYPE_DOT" in fusions and not any("CONVOLUTION" in f for f in fusions)
    assert xla_options.compiler_options("gpu") == {} and xla_options.compiler_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_options.compiler_options("cpu") == {}


def test_jit_compiles_lone_convolutions_without_ynnpack_and_same_result(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # read at jit time; the backend is already up
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 32)).astype(np.float32))
    kernel = jnp.asarray(0.1 * rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
    # the pinned jaxlib hands this convolution to YNNPACK by default
    assert "ynn_fusion" in jax.jit(conv).lower(x, kernel).compile().as_text()
    assert "ynn_fusion" not in xla_options.jit(conv).lower(x, kernel).compile().as_text()
    np.testing.assert_allclose(xla_options.jit(conv)(x, kernel), jax.jit(conv)(x, kernel), rtol=1e-4, atol=1e-4)
    grad = lambda k, x: jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k) + 0.5)))(k)
    assert "ynn_fusion" in jax.jit(grad).lower(kernel, x).compile().as_text()
    np.testing.assert_allclose(xla_options.jit(grad)(kernel, x), jax.jit(grad)(kernel, x), rtol=1e-4, atol=1e-3)
    # a lone kernel gradient (the tanh derivative computed apart) runs as XLA's own convolution
    kernel_grad = lambda k, x, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]
    g = jnp.tanh(jax.jit(conv)(x, kernel))
    assert "ynn_fusion" in jax.jit(kernel_grad).lower(kernel, x, g).compile().as_text()
    assert "ynn_fusion" not in xla_options.jit(kernel_grad).lower(kernel, x, g).compile().as_text()
    np.testing.assert_allclose(xla_options.jit(kernel_grad)(kernel, x, g), jax.jit(kernel_grad)(kernel, x, g),
                               rtol=1e-4, atol=1e-3)
