import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.distributed.placement import shard_batch
from fmjax.nets.layers import global_dropout
from fmjax.nets.cpu.dropout import Dropout, keep_mask


@pytest.mark.parametrize("channels", [64, 5])
@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_keep_mask_frequency_and_independence(channels, rate):
    shape = (16, 32, 32, channels)
    keep = np.asarray(keep_mask(jax.random.PRNGKey(0), shape, rate))
    n = keep.size
    p = 1 - rate
    assert abs(keep.mean() - p) < 5 * np.sqrt(rate * p / n)
    # neighbours along every axis agree as often as independent draws would
    for axis in range(4):
        first, second = np.take(keep, range(shape[axis] - 1), axis), np.take(keep, range(1, shape[axis]), axis)
        assert abs(np.mean(first == second) - (p * p + rate * rate)) < 0.01, axis
    # so do the masks of two keys, also with one shifted by a row
    other = np.asarray(keep_mask(jax.random.PRNGKey(1), shape, rate))
    assert abs(np.mean(keep == other) - (p * p + rate * rate)) < 0.01
    assert abs(np.mean(keep[1:] == other[:-1]) - (p * p + rate * rate)) < 0.01
    # and every channel keeps at the same rate
    per_channel = keep.reshape(-1, channels).mean(0)
    assert np.all(np.abs(per_channel - p) < 6 * np.sqrt(rate * p / (n / channels)))


def test_keep_mask_is_the_same_when_the_batch_is_split_over_devices():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    shape = (2 * len(jax.devices()), 8, 8, 6)
    key = jax.random.PRNGKey(3)
    split = jax.jit(lambda k: keep_mask(k, shape, 0.3), out_shardings=NamedSharding(mesh, P("data")))(key)
    assert len(split.sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(split), np.asarray(keep_mask(key, shape, 0.3)))


def test_dropout_scales_kept_values_zeroes_the_rest_and_is_keyed():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 16)) + 3.0
    drop = Dropout(0.25, deterministic=False)
    y = drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_array_equal(y, drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)}))
    assert not np.array_equal(y, drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(3)}))
    # the gradient is the same mask and scale
    grad = jax.grad(lambda x: jnp.sum(drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)})))(x)
    np.testing.assert_allclose(grad, kept / 0.75, rtol=1e-6)


def test_dropout_pass_through_and_edge_rates():
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1.0
    rngs = {"dropout": jax.random.PRNGKey(0)}
    np.testing.assert_array_equal(Dropout(0.5, deterministic=True).apply({}, x), x)
    np.testing.assert_array_equal(Dropout(0.5).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0, deterministic=False).apply({}, x, rngs=rngs), x)
    np.testing.assert_array_equal(Dropout(1.0, deterministic=False).apply({}, x, rngs=rngs), 0 * x)
    with pytest.raises(ValueError, match="broadcast_dims"):
        Dropout(0.5, broadcast_dims=(1,), deterministic=False).apply({}, x, rngs=rngs)


@pytest.mark.parametrize("channels", [4, 3])
def test_global_dropout_of_the_pmap_step_reproduces_the_unsharded_masks(channels):
    n = jax.local_device_count()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, channels))
    key = jax.random.PRNGKey(7)
    drop = Dropout(0.3, deterministic=False)
    apply = lambda rows: drop.apply({}, rows, rngs={"dropout": key})

    def sharded(rows):
        with global_dropout(jax.lax.axis_index("data"), jax.lax.axis_size("data")):
            return apply(rows)

    reference = jax.jit(apply)(x)
    rows = shard_batch(x, n)
    out = jax.pmap(sharded, axis_name="data")(rows)
    np.testing.assert_array_equal(np.asarray(out).reshape(x.shape), reference)
    assert 0 < np.mean(np.asarray(reference) == 0) < 1
    # each device draws its own rows only: nothing of the global batch's shape is built
    program = jax.pmap(sharded, axis_name="data").lower(rows).as_text()
    assert f"tensor<{x.shape[0] // n}x4x4x{channels}xf32>" in program
    assert f"tensor<{x.shape[0]}x4x4x{channels}x" not in program


def test_keep_mask_rows_of_a_larger_batch():
    key = jax.random.PRNGKey(5)
    full = np.asarray(keep_mask(key, (8, 6, 5, 3), 0.4))
    np.testing.assert_array_equal(np.asarray(keep_mask(key, (3, 6, 5, 3), 0.4, first_row=4)), full[4:7])
    traced = jax.jit(lambda r: keep_mask(key, (2, 6, 5, 3), 0.4, first_row=r))
    np.testing.assert_array_equal(np.asarray(traced(6)), full[6:])
    assert not np.array_equal(full[:4], full[4:])
