"""The Flow Mismatching scorer: closed-form Gaussian check, loop equivalence, rules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

import references
from fmjax import errors
from fmjax.methods import maps as maps_lib
from fmjax.methods import rules
from fmjax.methods.flow_mismatch import chunking
from fmjax.methods.flow_mismatch import scorer as fm
from fmjax.methods.flow_mismatch import settings as fm_settings
from fmjax.methods.flow_mismatch.settings import FlowMismatchSettings

# ----------------------------------------------------------------------------- Gaussian check

def gauss_a(t, s):
    return (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)


def gauss_velocity(mu, s):
    """Exact optimal velocity v^p_t(x) for normal law X1 ~ N(mu, s^2) per pixel."""
    def velocity(x, t, y=None):
        tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
        return mu + gauss_a(tb, s) * (x - tb * mu)
    return velocity


def closed_form_mismatch(t, mu, s, mu_q, s_q):
    a = gauss_a(t, s)
    return (a * t - 1) ** 2 * (s_q**2 + (mu_q - mu) ** 2) + (a * (1 - t) + 1) ** 2


def fisher(t, mu, s, mu_q, s_q):
    var_p = t**2 * s**2 + (1 - t) ** 2
    var_q = t**2 * s_q**2 + (1 - t) ** 2
    return var_q * (1 / var_p - 1 / var_q) ** 2 + t**2 * (mu_q - mu) ** 2 / var_p**2


def gaussian_case(num_images=8, num_paths=32, side=32):
    """Normal law N(0.1, 0.3^2), test law N(0.4, 0.5^2) per pixel: (mu, s, mu_q, s_q), test
    images [num_images, side, side, 1] from the test law, noise [num_paths, ...], 5 times."""
    mu, s, mu_q, s_q = 0.1, 0.3, 0.4, 0.5
    rng = np.random.default_rng(0)
    images = jnp.asarray(mu_q + s_q * rng.standard_normal((num_images, side, side, 1)), jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(1), (num_paths, side, side, 1))
    return (mu, s, mu_q, s_q), images, noise, jnp.asarray(fm.interior_times(5))


def test_scorer_matches_closed_form_mismatch():
    (mu, s, mu_q, s_q), images, noise, times = gaussian_case()
    num_images, num_paths, side = images.shape[0], noise.shape[0], images.shape[1]
    delta = fm.mismatch_delta(gauss_velocity(mu, s), images, noise, times, chunk_size=40)
    assert delta.shape == (num_images, 5, num_paths, side, side)
    measured = np.asarray(delta.mean(axis=(0, 2, 3, 4)))
    n_y, n_eps = num_images * side * side, num_paths * side * side
    for j, t in enumerate(np.asarray(times)):
        expected = closed_form_mismatch(t, mu, s, mu_q, s_q)
        # delta = (A (y - mu) + B eps)^2 with A = a t - 1, B = a (1 - t) + 1; images and
        # noise are shared across pairs, so the Monte-Carlo error comes from each separately
        a = gauss_a(t, s)
        coef_y, coef_eps = (a * t - 1) ** 2, (a * (1 - t) + 1) ** 2
        var_y2 = 2 * s_q**4 + 4 * s_q**2 * (mu_q - mu) ** 2
        cross = 4 * coef_y * coef_eps * (s_q**2 + num_images * (mu_q - mu) ** 2) / (n_y * num_paths)
        stderr = math.sqrt(coef_y**2 * var_y2 / n_y + coef_eps**2 * 2 / n_eps + cross)
        assert abs(measured[j] - expected) < 5 * stderr, (t, measured[j], expected, stderr)
        if t > 0.5:  # late on the path a misspecified normal law is clearly rejected
            wrong = closed_form_mismatch(t, mu, 2 * s, mu_q, s_q)
            assert abs(measured[j] - wrong) > 20 * stderr, (t, wrong)


def test_excess_over_the_test_laws_own_velocity_is_the_fisher_term():
    """METHOD.md's decomposition measured through the scorer: the mismatch of the normal
    law's velocity minus that of the test law's own optimal velocity, on the same images and
    noise, is ((1 - t) / t)^2 times the Fisher divergence between the path marginals."""
    (mu, s, mu_q, s_q), images, noise, times = gaussian_case()
    normal = np.asarray(fm.mismatch_delta(gauss_velocity(mu, s), images, noise, times, chunk_size=40))
    own = np.asarray(fm.mismatch_delta(gauss_velocity(mu_q, s_q), images, noise, times, chunk_size=40))
    for j, t in enumerate(np.asarray(times)):
        excess = normal[:, j] - own[:, j]
        expected = ((1 - t) / t) ** 2 * fisher(t, mu, s, mu_q, s_q)
        stderr = math.sqrt(excess.var() / images.size)  # the paths share the images: not counted
        assert abs(excess.mean() - expected) < 4 * stderr, (t, excess.mean(), expected, stderr)
        assert expected > 10 * stderr


def test_shifted_half_lights_up():
    mu, s = 0.0, 0.3
    rng = np.random.default_rng(1)
    images = mu + s * rng.standard_normal((2, 16, 16, 1))
    images[:, :, :8] += 0.8  # left half off the normal law
    noise = jax.random.normal(jax.random.PRNGKey(2), (8, 16, 16, 1))
    times = jnp.asarray(fm.interior_times(6))
    delta = fm.mismatch_delta(gauss_velocity(mu, s), jnp.asarray(images, jnp.float32), noise, times, 64)
    maps = np.asarray(fm.heat_maps(delta, times, "rank:2", "t2"))
    left, right = maps[:, :, :8].mean(), maps[:, :, 8:].mean()
    assert left > 3 * right
    assert (maps[:, :, :8].mean(axis=(1, 2)) > maps[:, :, 8:].max(axis=(1, 2)) * 0.5).all()


# ----------------------------------------------------------------------------- the jitted scorer

def toy_apply(params, x, t, y=None):
    """A cheap nonlinear velocity field with a spatial mix and a class-label term, standing
    in for a network."""
    tb = t.reshape(-1, 1, 1, 1)
    shifted = jnp.roll(x, 1, axis=1)
    v = params["a"] * jnp.tanh(x + tb) + params["b"] * shifted * tb
    return v if y is None else v + params["c"] * jnp.reshape(y, (-1, 1, 1, 1))


PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(-0.3), "c": jnp.float32(0.25)}


def toy_velocity(x, t, label):
    """toy_apply on numpy inputs [K,H,W,C] at one time, for the reference loop."""
    n = len(x)
    y = None if label is None else jnp.full((n,), label)
    return np.asarray(toy_apply(PARAMS, jnp.asarray(x, jnp.float32), jnp.full((n,), t, jnp.float32), y))


def loop_reference(images_u8, config, labels=None):
    """Maps and scores by the definition (tests/references.py), on the toy field."""
    return references.reference_scores(toy_velocity, images_u8, config, labels)


def test_scorer_equals_plain_loop_and_chunking_is_invisible():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 12, 12, 2), dtype=np.uint8)
    base = FlowMismatchSettings(num_paths=3, num_times=4, aggregate="rank:2", time_weight="t2",
                       image_score="max_plus_top1", smooth_sigma=1.0, chunk_size=5, image_batch=2)
    scorer = fm.Scorer(toy_apply, base, (12, 12, 2))
    maps, scores = scorer.score(PARAMS, images)
    ref_maps, ref_scores = loop_reference(images, base)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    for chunk, batch in [(1, 1), (7, 3), (12, 1), (100, 4)]:
        other = fm.Scorer(toy_apply, FlowMismatchSettings(**{**base.__dict__, "chunk_size": chunk,
                                                          "image_batch": batch}), (12, 12, 2))
        m, s = other.score(PARAMS, images)
        np.testing.assert_allclose(m, maps, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s, scores, rtol=1e-6, atol=1e-7)


def test_class_labels_reach_the_network():
    """Each image is scored with its own label, on the per-image path and on the path that
    spreads one image's grid over the devices."""
    images = np.random.default_rng(8).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2])
    cfg = FlowMismatchSettings(num_paths=3, num_times=2, aggregate="min", time_weight="t2", image_score="max",
                      smooth_sigma=0.0, chunk_size=4, image_batch=1)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1))
    maps, scores = scorer.score(PARAMS, images, labels)
    ref_maps, ref_scores = loop_reference(images, cfg, labels)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    unlabelled = scorer.score(PARAMS, images)[0]  # no labels: class 0 for every image
    np.testing.assert_allclose(unlabelled[0], maps[0], rtol=1e-6)
    for i in (1, 2, 3):
        assert np.abs(unlabelled[i] - maps[i]).max() > 1e-2 * np.abs(maps[i]).max()
    one = scorer.score(PARAMS, images[1:2], labels[1:2])[0]  # fewer images than devices
    np.testing.assert_allclose(one[0], ref_maps[1], rtol=1e-5, atol=1e-6)


def test_calls_are_evened_out_under_the_chunk_size():
    assert chunking.even_chunk(480, 236) == 160  # 3 calls either way, no padded input
    assert chunking.even_chunk(64, 16) == 16
    assert chunking.even_chunk(10, 100) == 10
    for inputs in range(1, 60):
        for most in range(1, 70):
            chunk = chunking.even_chunk(inputs, most)
            calls = -(-inputs // most)
            assert chunk <= most and -(-inputs // chunk) == calls and chunk * calls - inputs < calls
    cfg = FlowMismatchSettings(num_paths=3, num_times=5, chunk_size=8, image_batch=2)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1), devices=jax.local_devices()[:2])
    assert scorer.chunk_for(4) == 8  # 30 inputs per device and call: 4 calls of 8 (2 padded)
    assert scorer.chunk_for(1) == 8  # 15 inputs over 2 devices: 8 each, one call
    cfg = FlowMismatchSettings(num_paths=3, num_times=5, chunk_size=11, image_batch=2, aggregate="mean",
                      time_weight="t2", image_score="max", smooth_sigma=0.0)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1), devices=jax.local_devices()[:2])
    assert scorer.chunk_for(4) == 10  # 30 inputs: 3 calls of 10, not of 11
    assert scorer.chunk_for(1) == 8
    images = np.random.default_rng(6).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    for part in (images, images[:1]):  # whole images per device; one image's grid over both
        ref = loop_reference(part, cfg)[0]
        np.testing.assert_allclose(scorer.score(PARAMS, part)[0], ref, rtol=1e-5, atol=1e-6)


def test_same_image_same_score_anywhere_and_single_device_equal():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    cfg = FlowMismatchSettings(num_paths=2, num_times=3, chunk_size=4, image_batch=1)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1))
    _, scores = scorer.score(PARAMS, images)
    _, reversed_scores = scorer.score(PARAMS, images[::-1])
    np.testing.assert_array_equal(scores, reversed_scores[::-1])
    one_device = fm.Scorer(toy_apply, cfg, (8, 8, 1), devices=jax.local_devices()[:1])
    np.testing.assert_allclose(one_device.score(PARAMS, images)[1], scores, rtol=1e-6)


def test_fewer_images_than_devices_spread_the_grid():
    assert jax.local_device_count() >= 2
    images = np.random.default_rng(7).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
    cfg = FlowMismatchSettings(num_paths=3, num_times=3, chunk_size=2, image_batch=1)  # 9 inputs: 5 chunks, padded to 6
    spread = fm.Scorer(toy_apply, cfg, (8, 8, 1))
    alone = fm.Scorer(toy_apply, cfg, (8, 8, 1), devices=jax.local_devices()[:1])
    maps, scores = spread.score(PARAMS, images)
    assert list(spread._grids) == [("maps", 1)]
    assert spread._batches["maps"].fn._cache_size() == 0  # the per-image path never ran
    want_maps, want_scores = alone.score(PARAMS, images)
    np.testing.assert_allclose(maps, want_maps, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    np.testing.assert_allclose(spread.delta(PARAMS, images), alone.delta(PARAMS, images), rtol=1e-6, atol=1e-7)
    index = fm.grid_index(1, 3, 3, 2, num_shards=2)
    assert index.shape == (6, 2, 3)
    assert sorted(map(tuple, index.reshape(-1, 3)[:9].tolist())) == [(0, t, k) for t in range(3) for k in range(3)]


def test_no_recompile_for_other_image_counts():
    cfg = FlowMismatchSettings(num_paths=2, num_times=2, chunk_size=3, image_batch=2)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1))
    rng = np.random.default_rng(5)
    scorer.score(PARAMS, rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
    compiled = scorer._batches["maps"].fn._cache_size()
    for n in (1, 2, 5, 9):
        scorer.score(PARAMS, rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    assert scorer._batches["maps"].fn._cache_size() == compiled == 1


def test_delta_tensor_reaggregates_to_maps():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    cfg = FlowMismatchSettings(num_paths=4, num_times=3, aggregate="median", time_weight="none",
                      image_score="max", chunk_size=8, image_batch=1)
    scorer = fm.Scorer(toy_apply, cfg, (8, 8, 1))
    delta = scorer.delta(PARAMS, images)
    assert delta.shape == (3, 3, 4, 8, 8)
    maps, scores = scorer.score(PARAMS, images)
    np.testing.assert_allclose(np.median(delta, axis=2).mean(axis=1), maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps.reshape(3, -1).max(1), scores, rtol=1e-6)


# ----------------------------------------------------------------------------- rules by hand

DELTA = jnp.asarray([5.0, 1.0, 4.0, 2.0, 3.0, 10.0]).reshape(6, 1, 1)  # K = 6 paths, one pixel


@pytest.mark.parametrize("rule, expected", [
    ("min", 1.0), ("rank:2", 2.0), ("rank:6", 10.0), ("quantile:0.5", 3.0),  # ceil(0.5*6)=3rd
    ("quantile:0.2", 2.0),  # ceil(1.2) = 2nd smallest
    ("mean", 25.0 / 6), ("median", 3.5), ("trimmed:0.2", 3.5),  # floor(1.2)=1 cut each end: 2,3,4,5
    ("trimmed:0.0", 25.0 / 6),
])
def test_aggregation_rules(rule, expected):
    assert float(fm.aggregate_paths(DELTA, rule, axis=0)[0, 0]) == pytest.approx(expected)


def test_median_odd_and_bad_rules():
    odd = jnp.asarray([3.0, 1.0, 2.0]).reshape(3, 1, 1)
    assert float(fm.aggregate_paths(odd, "median", axis=0)[0, 0]) == 2.0
    for bad in ("rank:0", "rank:7", "quantile:0", "trimmed:0.5", "max", "rank:x"):
        with pytest.raises(errors.ScoreRuleError):
            fm_settings.parse_aggregate(bad, 6)


def test_time_weights_and_average():
    times = jnp.asarray([0.25, 0.5])
    per_time = jnp.asarray([4.0, 8.0]).reshape(1, 2, 1, 1)
    # (1/T) sum w_j A_j = (0.0625*4 + 0.25*8) / 2
    assert float(fm.aggregate_times(per_time, times, "t2")[0, 0, 0]) == pytest.approx(1.125)
    assert float(fm.aggregate_times(per_time, times, "none")[0, 0, 0]) == pytest.approx(6.0)
    np.testing.assert_allclose(fm.interior_times(3), [0.25, 0.5, 0.75])


def test_image_score_rules():
    maps = jnp.arange(200, dtype=jnp.float32).reshape(1, 10, 20)  # 200 pixels, top 1% = 2 pixels
    assert float(maps_lib.image_score(maps, "max")[0]) == 199
    assert float(maps_lib.image_score(maps, "max_plus_top1")[0]) == pytest.approx(199 + 198.5)
    assert float(maps_lib.image_score(maps, "topk_mean:0.05")[0]) == pytest.approx(np.mean(np.arange(190, 200)))
    small = jnp.asarray([[[1.0, 3.0], [2.0, 0.0]]])  # 4 pixels: top 1% is still one pixel
    assert float(maps_lib.image_score(small, "max_plus_top1")[0]) == 6.0
    with pytest.raises(errors.ScoreRuleError):
        rules.parse_image_score("top")


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0, 9.0])  # 9: the radius exceeds both sides
@pytest.mark.parametrize("smooth", [maps_lib.gaussian_smooth, maps_lib._smooth_by_slices, maps_lib._smooth_by_matmul])
def test_smoothing_matches_scipy(sigma, smooth):
    maps = np.random.default_rng(7).random((2, 13, 11)).astype(np.float32)
    ours = np.asarray(jax.jit(smooth, static_argnums=1)(jnp.asarray(maps), sigma))
    ref = np.stack([scipy.ndimage.gaussian_filter(m, sigma, mode="reflect") for m in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_smoothing_uses_matrix_products_on_cpu_only():
    maps = jnp.zeros((2, 8, 8))
    lowered = jax.jit(maps_lib.gaussian_smooth, static_argnums=1).lower(maps, 2.0)
    assert ("dot_general" in lowered.as_text()) == (jax.default_backend() == "cpu")
    np.testing.assert_allclose(maps_lib.blur_matrix(8, 2.0).sum(1), 1.0, rtol=1e-6)  # rows are whole kernels


# ----------------------------------------------------------------------------- chunk size from a memory budget

def test_forward_memory_is_affine_and_budget_picks_the_chunk_that_fits():
    from fmjax.config import NetConfig
    from fmjax.nets.unet import UNet
    from fmjax.nets.unet import abstract_params

    net = NetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_rates=(2,),
                    num_head_channels=8, dropout=0.0, num_groups=4)
    shape = (16, 16, 1)
    module = UNet(net, out_channels=1)
    params = abstract_params(net, shape)  # shapes are all the memory analysis needs
    apply = lambda p, x, t, y: module.apply(p, x, t)
    sizes = {c: chunking.forward_bytes(apply, params, shape, c) for c in (1, 4, 12)}
    per_input = (sizes[4] - sizes[1]) / 3
    assert per_input > 4 * math.prod(shape)  # at least the activations of one image
    assert sizes[12] == pytest.approx(sizes[1] + 11 * per_input, rel=0.1)

    params_bytes = sum(leaf.size * 4 for leaf in jax.tree_util.tree_leaves(params))
    fixed = 10_000
    budget = params_bytes + fixed + sizes[12]
    chunk = chunking.chunk_size_for_budget(apply, params, shape, budget, max_chunk=1000, fixed_bytes=fixed)
    assert 10 <= chunk <= 14
    assert chunking.chunk_size_for_budget(apply, params, shape, 2 * budget, max_chunk=1000,
                                          fixed_bytes=fixed) > 2 * chunk
    assert chunking.chunk_size_for_budget(apply, params, shape, budget, max_chunk=6, fixed_bytes=fixed) == 6
    with pytest.raises(errors.ScoreRuleError, match="memory_budget_mb"):
        chunking.chunk_size_for_budget(apply, params, shape, params_bytes, max_chunk=8, fixed_bytes=fixed)


@pytest.mark.parametrize("max_chunk", [480, 9, 1])
def test_budget_chunk_fits_when_memory_is_not_affine_at_small_chunks(monkeypatch, max_chunk):
    """The shape of the paper preset at 256x256: one input reserves more than four."""
    reserved = lambda chunk: 600 if chunk == 1 else 35 + 115 * chunk
    compiled = []
    monkeypatch.setattr(chunking, "forward_bytes",
                        lambda apply_fn, params, shape, chunk: compiled.append(chunk) or reserved(chunk))
    params = {"w": np.zeros(10, np.float32)}  # 40 bytes
    room = 2000
    chunk = chunking.chunk_size_for_budget(None, params, (8, 8, 1), room + 40 + 100, max_chunk, fixed_bytes=100)
    best = max(c for c in range(1, max_chunk + 1) if reserved(c) <= room)
    assert chunk == best
    assert len(compiled) == len(set(compiled)) <= 8


def test_auto_chunk_scorer_equals_fixed_chunk():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 12, 12, 2), dtype=np.uint8)
    fixed = FlowMismatchSettings(num_paths=3, num_times=4, chunk_size=5, image_batch=2)
    auto = FlowMismatchSettings(**{**fixed.__dict__, "chunk_size": 0, "memory_budget_mb": 1})
    scorer = fm.Scorer(toy_apply, auto, (12, 12, 2))
    maps, scores = scorer.score(PARAMS, images)
    with pytest.raises(errors.ScoreRuleError, match="first scoring call"):
        fm.Scorer(toy_apply, auto, (12, 12, 2)).chunk_for(3)
    assert 1 <= scorer.config.chunk_size <= 2 * 4 * 3
    ref_maps, ref_scores = fm.Scorer(toy_apply, fixed, (12, 12, 2)).score(PARAMS, images)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-7)
