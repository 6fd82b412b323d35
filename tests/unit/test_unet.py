import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.config import NetConfig
from references import random_unet_params

from fmjax.nets import layers
from fmjax.nets.cpu import layers as cpu_layers
from fmjax.nets.cpu.layers import conv3x3_as_matmul
from fmjax.nets.layers import num_norm_groups
from fmjax.nets.unet import UNet, abstract_params, create, param_count

TINY = NetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_rates=(2,),
                 num_head_channels=8, dropout=0.0, num_groups=4)
PAPER_PARAMS = 45_285_443  # NetConfig() at 256x256x3


def perturb(params, seed, scale=0.1):
    """Adds noise to every parameter so that zero-initialised layers become active."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def images(seed, n, size=16, c=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, (n, size, size, c)).astype(np.float32))


def jitted(module):
    return jax.jit(module.apply, static_argnames="train")


@pytest.fixture(scope="module")
def tiny():
    module, params = create(TINY, (16, 16, 1), jax.random.PRNGKey(0))
    return module, jitted(module), params, perturb(params, 1)


def test_paper_preset_parameter_count():
    n = param_count(abstract_params(NetConfig(), (256, 256, 3)))
    assert n == PAPER_PARAMS
    assert abs(n - 45.3e6) / 45.3e6 < 0.03


def test_other_variants_change_count():
    base = param_count(abstract_params(TINY, (16, 16, 1)))
    plain = dataclasses.replace(TINY, resblock_updown=False, scale_shift_norm=False)
    assert param_count(abstract_params(plain, (16, 16, 1))) != base
    # no attention anywhere but the middle block: fewer parameters
    assert param_count(abstract_params(dataclasses.replace(TINY, attention_rates=()), (16, 16, 1))) < base


def test_group_count_divides_channels():
    assert num_norm_groups(32, 64) == 32
    assert num_norm_groups(32, 8) == 8
    assert num_norm_groups(8, 12) == 4
    assert num_norm_groups(32, 48) == 16


def test_output_shape_and_dtype_grey(tiny):
    _, apply, params, perturbed = tiny
    for size in (8, 32):  # parameters do not depend on the resolution
        out = apply(perturbed, images(2, 3, size), jnp.array([0.1, 0.5, 0.9]))
        assert out.shape == (3, size, size, 1)
        assert out.dtype == jnp.float32
        assert np.all(np.isfinite(out))
    # a scalar t broadcasts over the batch
    x = images(3, 3, 8)
    np.testing.assert_allclose(apply(perturbed, x, 0.3), apply(perturbed, x, jnp.full((3,), 0.3)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        apply(params, images(2, 1, 9), jnp.array([0.5]))  # not divisible by 2 ** (levels - 1)


def test_output_shape_and_dtype_rgb_plain_variant():
    # conv down/up-sampling, additive embedding, a third level and GroupNorm(32) on 8..32 channels
    cfg = dataclasses.replace(TINY, channel_mult=(1, 2, 2), resblock_updown=False, scale_shift_norm=False,
                              num_groups=32)
    module, params = create(cfg, (16, 16, 3), jax.random.PRNGKey(0))
    assert isinstance(module, UNet) and module.out_channels == 3
    assert set(params) == {"params"}
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    apply = jitted(module)
    params = perturb(params, 1)
    for size in (16, 32):
        out = apply(params, images(2, 2, size, 3), jnp.array([0.2, 0.8]))
        assert out.shape == (2, size, size, 3)
        assert out.dtype == jnp.float32
        assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3


def test_zero_output_at_init_and_dependence_on_t_and_x(tiny):
    _, apply, params, perturbed = tiny
    x = images(3, 2)
    t = jnp.array([0.2, 0.7])
    np.testing.assert_array_equal(apply(params, x, t), 0.0)

    out = apply(perturbed, x, t)
    assert np.abs(out).max() > 1e-3
    out_t = apply(perturbed, x, t + 0.05)
    assert np.abs(out - out_t).max() > 1e-4
    out_x = apply(perturbed, images(4, 2), t)
    assert np.abs(out - out_x).max() > 1e-3


def test_batch_independence(tiny):
    _, apply, _, perturbed = tiny
    x = images(5, 4)
    t = jnp.array([0.0, 0.3, 0.6, 1.0])
    batched = apply(perturbed, x, t)
    single = jnp.concatenate([apply(perturbed, x[i:i + 1], t[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_class_conditioning(tiny):
    cfg = dataclasses.replace(TINY, num_classes=3)
    params = random_unet_params(cfg, (16, 16, 1), 1)
    assert params["params"]["label_emb"]["embedding"].shape == (4, 4 * cfg.base_channels)  # + null class
    apply = jitted(UNet(cfg, out_channels=1))
    x = images(6, 2)
    t = jnp.array([0.4, 0.4])
    out0 = apply(params, x, t, jnp.array([0, 0]))
    out1 = apply(params, x, t, jnp.array([1, 1]))
    out_none = apply(params, x, t)
    assert np.abs(out0 - out1).max() > 1e-4
    assert np.abs(out0 - out_none).max() > 1e-4
    np.testing.assert_allclose(out_none, apply(params, x, t, jnp.array([3, 3])), rtol=1e-6, atol=1e-6)
    # mixed labels in one batch: each item gets its own label
    mixed = apply(params, x, t, jnp.array([0, 1]))
    np.testing.assert_allclose(mixed[0], out0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], out1[1], rtol=1e-5, atol=1e-5)
    # without num_classes the labels are ignored
    _, apply0, _, params0 = tiny
    np.testing.assert_array_equal(apply0(params0, x, t, jnp.array([0, 1])), apply0(params0, x, t))


def test_dropout_only_in_training(tiny):
    cfg = dataclasses.replace(TINY, dropout=0.3)
    params = random_unet_params(cfg, (16, 16, 1), 1)
    apply = jitted(UNet(cfg, out_channels=1))
    x = images(7, 2)
    t = jnp.array([0.5, 0.5])
    eval_a = apply(params, x, t)
    eval_b = apply(params, x, t, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(8)})
    train_a2 = apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(8)})
    train_b = apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(9)})
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(train_a - train_b).max() > 1e-4
    assert np.abs(train_a - eval_a).max() > 1e-4
    with pytest.raises(Exception):
        apply(params, x, t, train=True)  # needs a dropout rng
    # dropout = 0: train and eval agree, no rng needed
    _, apply0, _, params0 = tiny
    np.testing.assert_array_equal(apply0(params0, x, t, train=True), apply0(params0, x, t))


def test_bfloat16_close_to_float32(tiny):
    _, apply32, _, perturbed = tiny
    apply16 = jitted(UNet(dataclasses.replace(TINY, dtype="bfloat16"), out_channels=1))
    x = images(10, 2)
    t = jnp.array([0.25, 0.75])
    out16 = apply16(perturbed, x, t)
    out32 = apply32(perturbed, x, t)
    assert out16.dtype == jnp.float32
    assert np.all(np.isfinite(out16))
    err = np.abs(out16 - out32).max() / np.abs(out32).max()
    assert 0 < err < 0.05
    # parameters stay float32 in bfloat16 mode
    shapes16 = abstract_params(dataclasses.replace(TINY, dtype="bfloat16"), (16, 16, 1))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes16))


def test_jit_vmap_and_grad(tiny):
    module, apply, _, perturbed = tiny
    x = images(5, 4)
    t = jnp.array([0.0, 0.3, 0.6, 1.0])

    def one(params, xi, ti):
        return module.apply(params, xi[None], ti[None])[0]

    vmapped = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(perturbed, x, t)
    np.testing.assert_allclose(vmapped, apply(perturbed, x, t), rtol=1e-5, atol=1e-5)

    def loss(params):
        return jnp.mean((module.apply(params, x, t) - x) ** 2)

    grads = jax.jit(jax.grad(loss))(perturbed)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(perturbed)
    norms = [float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0  # every parameter gets a gradient


def test_grad_inside_shard_map_equals_grad_of_the_whole_batch(tiny):
    """Data parallelism written with shard_map: the batch split over a `data` mesh, the
    parameters replicated; the summed per-device gradients are the whole batch's."""
    module, _, _, perturbed = tiny
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:2]), ("data",))
    P = jax.sharding.PartitionSpec
    x, t = images(6, 4), jnp.array([0.1, 0.4, 0.7, 0.9])

    def loss(params, x, t):
        return jnp.sum((module.apply(params, x, t) - x) ** 2)

    split = jax.shard_map(lambda p, x, t: jax.lax.psum(loss(p, x, t), "data"), mesh=mesh,
                          in_specs=(P(), P("data"), P("data")), out_specs=P())
    got = jax.jit(jax.grad(split))(perturbed, x, t)
    want = jax.jit(jax.grad(loss))(perturbed, x, t)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("GroupNorm", [layers.GroupNorm, cpu_layers.GroupNorm], ids=["plain", "cpu"])
@pytest.mark.parametrize("silu,emb", [(False, False), (True, False), (True, True)])
def test_group_norm_equals_flax_group_norm_with_its_gradients(silu, emb, GroupNorm):
    """Both GroupNorms have nn.GroupNorm's parameters; their result, with the optional
    scale-shift h * (1 + scale) + shift and SiLU after it, and their gradients (for x, both
    parameters and the scale and shift) are those of nn.GroupNorm followed by the same."""

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 5, 12)) * 3.0 + 1.5
    scale_shift = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 12)) if emb else None
    module = GroupNorm(4, silu=silu)
    params = module.init(jax.random.PRNGKey(1), x)
    flax_norm = nn.GroupNorm(num_groups=4, epsilon=1e-5)
    assert jax.tree.map(jnp.shape, params["params"]["norm"]) == jax.tree.map(
        jnp.shape, flax_norm.init(jax.random.PRNGKey(1), x)["params"])
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def ours(p, x, e):
        return module.apply(p, x, *(() if e is None else e))

    def reference(p, x, e):
        h = flax_norm.apply({"params": p["params"]["norm"]}, x)
        if e is not None:
            h = h * (1 + e[0][:, None, None]) + e[1][:, None, None]
        return nn.silu(h) if silu else h

    np.testing.assert_allclose(ours(params, x, scale_shift), reference(params, x, scale_shift), rtol=1e-4, atol=1e-5)
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    loss = lambda f: lambda p, x, e: jnp.sum(jnp.sin(f(p, x, e)) * weights)
    argnums = (0, 1, 2) if emb else (0, 1)
    got = jax.grad(loss(ours), argnums)(params, x, scale_shift)
    want = jax.grad(loss(reference), argnums)(params, x, scale_shift)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 2), (3, 3), (5, 4)])
def test_conv3x3_as_matmul_matches_the_convolution_and_its_gradients(hw):
    rng = np.random.default_rng(hw[0] * 10 + hw[1])
    x = jnp.asarray(rng.standard_normal((3, *hw, 5)).astype(np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 4)).astype(np.float32))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv3x3_as_matmul(x, kernel), conv(x, kernel), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    for got, want in zip(jax.grad(loss(conv3x3_as_matmul), (0, 1))(x, kernel), jax.grad(loss(conv), (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("Conv", [layers.Conv, cpu_layers.Conv], ids=["plain", "cpu"])
@pytest.mark.parametrize("kernel,strides,size", [(3, 1, 2), (3, 1, 1), (3, 1, 6), (3, 2, 6), (1, 1, 2)])
def test_conv_has_nn_conv_parameters_and_result(kernel, strides, size, Conv):
    x = jnp.asarray(np.random.default_rng(size).standard_normal((2, size, size, 6)).astype(np.float32))
    ours = Conv(7, kernel, strides=strides)
    pad = ((1, 1), (1, 1)) if kernel == 3 else ((0, 0), (0, 0))
    flax_conv = nn.Conv(7, (kernel, kernel), strides=(strides, strides), padding=pad,
                        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))
    params = ours.init(jax.random.PRNGKey(3), x)
    want_params = flax_conv.init(jax.random.PRNGKey(3), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, want_params)
    np.testing.assert_array_equal(params["params"]["kernel"], want_params["params"]["kernel"])
    params = perturb(params, seed=size)  # a non-zero bias too
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-5, atol=1e-5)
