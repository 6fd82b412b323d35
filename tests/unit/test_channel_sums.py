import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.nets.cpu.channel_sums import channel_sum, side_by_side, spread, wide_channel_sum


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 5, 16), (3, 13, 11, 600), (1, 1, 1, 2), (5, 9, 32)])
def test_channel_sum_equals_the_plain_sum(shape):
    x = jnp.asarray(np.random.default_rng(len(shape) + shape[-1]).standard_normal(shape).astype(np.float32))
    lead = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(channel_sum(x), jnp.sum(x, lead), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(channel_sum(x, keep_batch=True), jnp.sum(x, lead[1:]), rtol=1e-5, atol=1e-4)
    assert channel_sum(x).shape == shape[-1:]
    assert channel_sum(x, keep_batch=True).shape == (shape[0], shape[-1])


def test_channel_sum_takes_several_rows_side_by_side():
    """The fast form: the first reduction runs over rows of k * C elements, k > 1."""
    x = jnp.ones((2, 16, 16, 8), jnp.float32)
    assert "tensor<1x8x512xf32>" in jax.jit(channel_sum).lower(x).as_text()  # 512 rows of 8 -> 8 rows of 64 * 8
    assert "tensor<2x4x512xf32>" in jax.jit(lambda x: channel_sum(x, keep_batch=True)).lower(x).as_text()


@pytest.mark.parametrize("shape", [(2, 16, 16, 8), (3, 5, 7, 12), (2, 4, 4, 600), (3, 10, 6)])
def test_side_by_side_view_broadcasts_and_sums_per_sample_and_channel(shape):
    rng = np.random.default_rng(shape[-1])
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((shape[0], shape[-1])).astype(np.float32))
    wide, per_channel = side_by_side(shape)
    view = wide(x)
    assert view.shape[0] == shape[0] and view.shape[-1] % shape[-1] == 0 and view.size == x.size
    per_sample = v.reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    np.testing.assert_array_equal((view * per_channel(v)).reshape(shape), x * per_sample)
    np.testing.assert_allclose(wide_channel_sum(view, shape[-1]), jnp.sum(x, tuple(range(1, x.ndim - 1))),
                               rtol=1e-5, atol=1e-4)
    if shape == (2, 16, 16, 8):
        assert view.shape == (2, 4, 512)  # 64 rows of 8 channels side by side


def test_spread_broadcasts_and_its_gradient_is_the_channel_sum():
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((3, 5)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 6, 4, 5)).astype(np.float32))
    np.testing.assert_array_equal(spread(v, w.shape), jnp.broadcast_to(v[:, None, None, :], w.shape))
    loss = lambda f: lambda v: jnp.sum(jnp.sin(f(v) * w))
    got = jax.grad(loss(lambda v: spread(v, w.shape)))(v)
    want = jax.grad(loss(lambda v: jnp.broadcast_to(v[:, None, None, :], w.shape)))(v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # second order and under vmap too
    h = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(spread(v, (3, 6, 4, 5)) ** 3))))(v[None])
    np.testing.assert_allclose(h[0], 3 * 24 * v ** 2, rtol=1e-5)
