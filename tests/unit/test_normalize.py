"""Flow Mismatching's maps with normal-image statistics (fmjax/methods/flow_mismatch/normalize.py),
checked against their definitions computed here with numpy."""
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ScoreRuleError
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.scorer import heat_maps, per_time_maps

T, H, W = 3, 5, 6
WEIGHTS = np.array([0.25, 0.5, 1.0], np.float32)


def normal_maps(n=40, seed=0):
    """Positive per-time maps [n, T, H, W] whose scale differs by time and by pixel."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 1.0, (T, H, W)))
    return (scale * rng.gamma(4.0, 0.25, (n, T, H, W))).astype(np.float32)


@pytest.mark.parametrize("mode", ["global", "pixel"])
def test_statistics_are_the_moments_of_the_normal_maps(mode):
    maps = normal_maps().astype(np.float64)
    stats = norm.fit_stats(maps, WEIGHTS, mode)
    axes = (0, 2, 3) if mode == "global" else (0,)
    shape = (T, 1, 1) if mode == "global" else (T, H, W)
    assert stats.mean.shape == shape
    np.testing.assert_allclose(stats.mean, maps.mean(axes).reshape(shape), rtol=1e-5)
    np.testing.assert_allclose(stats.std, maps.std(axes).reshape(shape), rtol=1e-5)
    logs = np.log(maps + norm.LOG_EPS)
    np.testing.assert_allclose(stats.log_mean, logs.mean(axes).reshape(shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.log_std, logs.std(axes).reshape(shape), rtol=1e-5)


def test_two_sided_map_is_the_rms_of_log_z_scores():
    normals = normal_maps()
    stats = norm.fit_stats(normals, WEIGHTS, "pixel")
    test = normal_maps(3, seed=1)
    got = np.asarray(norm.mismatch_map(jnp.asarray(test), jnp.asarray(WEIGHTS), "pixel", "two_sided", stats))
    logs = np.log(normals.astype(np.float64) + norm.LOG_EPS)
    z = (np.log(test + norm.LOG_EPS) - logs.mean(0)) / logs.std(0)
    np.testing.assert_allclose(got, np.sqrt((z ** 2).mean(1)), rtol=1e-4)


def test_weighted_map_with_statistics_is_the_weighted_mean_of_z_scores():
    normals = normal_maps()
    stats = norm.fit_stats(normals, WEIGHTS, "global")
    test = normal_maps(2, seed=2)
    got = np.asarray(norm.mismatch_map(jnp.asarray(test), jnp.asarray(WEIGHTS), "global", "weighted", stats))
    n64 = normals.astype(np.float64)
    z = (test - n64.mean((0, 2, 3))[:, None, None]) / n64.std((0, 2, 3))[:, None, None]
    np.testing.assert_allclose(got, np.einsum("nthw,t->nhw", z, WEIGHTS) / T, rtol=1e-4, atol=1e-5)
    raw = np.asarray(norm.mismatch_map(jnp.asarray(test), jnp.asarray(WEIGHTS), "none", "weighted", stats))
    np.testing.assert_allclose(raw, np.einsum("nthw,t->nhw", test, WEIGHTS) / T, rtol=1e-5)


def test_combined_map_standardises_both_parts_on_the_normals():
    normals = normal_maps()
    stats = norm.fit_stats(normals, WEIGHTS, "global")
    combined = np.asarray(norm.mismatch_map(jnp.asarray(normals), jnp.asarray(WEIGHTS), "global", "combined", stats))
    one = np.asarray(norm.mismatch_map(jnp.asarray(normals), jnp.asarray(WEIGHTS), "global", "weighted", stats))
    two = np.asarray(norm.mismatch_map(jnp.asarray(normals), jnp.asarray(WEIGHTS), "global", "two_sided", stats))
    np.testing.assert_allclose(combined, (one - one.mean()) / one.std() + (two - two.mean()) / two.std(),
                               rtol=1e-3, atol=1e-4)
    assert abs(combined.mean()) < 1e-3


def test_a_pixel_with_unusually_low_mismatch_stands_out_only_in_the_two_sided_map():
    normals = normal_maps(200)
    stats = norm.fit_stats(normals, WEIGHTS, "pixel")
    test = np.array(np.median(normals, axis=0, keepdims=True))  # a typical image
    test[0, :, 2, 3] /= 50.0  # far too little mismatch at one pixel (e.g. a blurred spot)
    two = np.asarray(norm.mismatch_map(jnp.asarray(test), jnp.asarray(WEIGHTS), "pixel", "two_sided", stats))[0]
    one = np.asarray(norm.mismatch_map(jnp.asarray(test), jnp.asarray(WEIGHTS), "pixel", "weighted", stats))[0]
    assert np.unravel_index(np.argmax(two), two.shape) == (2, 3)
    assert np.unravel_index(np.argmin(one), one.shape) == (2, 3)


def test_stored_statistics_round_trip_and_are_checked_against_the_settings():
    stats = norm.fit_stats(normal_maps(), WEIGHTS, "pixel")
    back = norm.from_arrays(norm.to_arrays(stats), T, (H, W))
    for a, b in zip(stats, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ScoreRuleError, match="other scoring settings"):
        norm.from_arrays(norm.to_arrays(stats), T + 1, (H, W))
    with pytest.raises(ScoreRuleError, match="other scoring settings"):
        norm.from_arrays(norm.to_arrays(stats), T, (H + 1, W))
    with pytest.raises(ScoreRuleError, match="has none"):
        norm.from_arrays({}, T, (H, W))


def test_rules_that_need_statistics_refuse_to_run_without_them():
    with pytest.raises(ScoreRuleError, match="normalize"):
        norm.mismatch_map(jnp.ones((1, T, H, W)), jnp.asarray(WEIGHTS), "none", "two_sided", norm.neutral_stats(T))
    with pytest.raises(ScoreRuleError, match="at least 2"):
        norm.fit_stats(normal_maps(1), WEIGHTS, "global")


def test_heat_maps_smooth_each_time_before_normalising():
    rng = np.random.default_rng(3)
    delta = rng.gamma(2.0, 1.0, (2, T, 4, H, W)).astype(np.float32)
    per_time = np.asarray(per_time_maps(jnp.asarray(delta), "mean", 1.0))
    from scipy import ndimage

    expected = ndimage.gaussian_filter(delta.mean(2), (0, 0, 1.0, 1.0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(per_time, expected, rtol=1e-4, atol=1e-5)
    stats = norm.fit_stats(per_time, WEIGHTS, "global")
    times = np.array([0.25, 0.5, 0.75], np.float32)
    maps = np.asarray(heat_maps(jnp.asarray(delta), times, "mean", "t2", 1.0, "global", "two_sided", stats))
    z = (np.log(expected + norm.LOG_EPS) - stats.log_mean) / stats.log_std
    np.testing.assert_allclose(maps, np.sqrt((z ** 2).mean(1)), rtol=1e-3, atol=1e-4)
