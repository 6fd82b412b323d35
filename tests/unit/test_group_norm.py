import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.nets.cpu.group_norm import group_norm


def reference(x, scale, shift, groups, silu, eps=1e-5):
    """The textbook formula, left to autodiff: per (sample, group) mean and variance."""
    n, c = x.shape[0], x.shape[-1]
    grouped = x.reshape(n, -1, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    xhat = ((grouped - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    per_channel = lambda v: v.reshape(n, *([1] * (x.ndim - 2)), c)
    z = xhat * per_channel(scale) + per_channel(shift)
    return jax.nn.silu(z) if silu else z


def inputs(shape, seed):
    rng = np.random.default_rng(seed)
    n, c = shape[0], shape[-1]
    x = rng.standard_normal(shape) * 2.0 + rng.standard_normal((n, 1, 1, c)) if len(shape) == 4 else (
        rng.standard_normal(shape) * 2.0 + 0.5)
    scale = 1.0 + 0.5 * rng.standard_normal((n, c))
    shift = rng.standard_normal((n, c))
    weights = rng.standard_normal(shape)
    return [jnp.asarray(a.astype(np.float32)) for a in (x, scale, shift, weights)]


@pytest.mark.parametrize("shape,groups", [((3, 8, 8, 16), 4), ((2, 5, 7, 12), 3), ((3, 10, 6), 2), ((2, 4, 6, 64), 8)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_and_its_gradients_equal_the_textbook_formula(shape, groups, silu):
    x, scale, shift, weights = inputs(shape, seed=shape[-1] + groups)
    np.testing.assert_allclose(group_norm(x, scale, shift, groups, silu), reference(x, scale, shift, groups, silu),
                               rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, scale, shift: jnp.sum(jnp.sin(f(x, scale, shift, groups, silu)) * weights)
    got = jax.jit(jax.grad(loss(group_norm), (0, 1, 2)))(x, scale, shift)
    want = jax.grad(loss(reference), (0, 1, 2))(x, scale, shift)
    for name, a, b in zip(("x", "scale", "shift"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()), err_msg=name)


def test_group_norm_of_a_constant_group_is_its_shift_with_finite_gradients():
    """A group without variance (a flat image region) normalises to 0, not NaN."""
    x = jnp.full((2, 4, 4, 8), 3.0)
    scale, shift = jnp.full((2, 8), 2.0), jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_allclose(group_norm(x, scale, shift, 2), jnp.broadcast_to(shift[:, None, None], x.shape),
                               atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(group_norm(*a, 2, True) ** 2), (0, 1, 2))(x, scale, shift)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_allclose(grads[1], 0.0, atol=1e-5)  # xhat = 0: the scale has no effect


def test_group_norm_differentiates_twice():
    """The hand-written gradient is itself differentiable (grad of grad equals the formula's)."""
    x, scale, shift, weights = inputs((2, 4, 4, 8), seed=7)
    inner = lambda f: lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, scale, shift, 2, True) * weights))(x) ** 2)
    np.testing.assert_allclose(jax.grad(inner(group_norm))(x), jax.grad(inner(reference))(x), rtol=1e-3, atol=1e-3)


def test_gradients_inside_shard_map_with_replicated_scale_and_shift():
    """Data-parallel use: x split over a `data` mesh, scale and shift built from replicated
    per-channel parameters; gradients equal the unsplit formula's."""
    devices = np.array(jax.local_devices()[:2])
    mesh = jax.sharding.Mesh(devices, ("data",))
    P = jax.sharding.PartitionSpec
    x, _, _, weights = inputs((4, 6, 6, 8), seed=3)
    scale_c, shift_c = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1.0, 1.0, 8)

    def loss(f, x, weights, scale_c, shift_c):
        n = x.shape[0]
        y = f(x, jnp.broadcast_to(scale_c, (n, 8)), jnp.broadcast_to(shift_c, (n, 8)), 2, True)
        return jnp.sum(jnp.sin(y) * weights)

    def split_loss(x, weights, scale_c, shift_c):
        local = lambda *a: jax.lax.psum(loss(group_norm, *a), "data")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P())(
            x, weights, scale_c, shift_c)

    got = jax.jit(jax.grad(split_loss, (0, 2, 3)))(x, weights, scale_c, shift_c)
    want = jax.grad(lambda *a: loss(reference, *a), (0, 2, 3))(x, weights, scale_c, shift_c)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
