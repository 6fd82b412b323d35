"""RADAR: schedule, patches/stitching, Sobel, features, forest, eps objective, scorer."""
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from fmjax import metrics, radar
from fmjax import train as fm_train
from fmjax.config import PRESETS, NetConfig
from fmjax.flow import to_model_range
from fmjax.radar import RadarConfig
from references import AffineField, ema_reference

# ----------------------------------------------------------------------------- Sobel

def test_sobel_step_edge_and_ramp_by_hand():
    step = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (4, 1))
    # columns 1 and 2 see 0 on the left and 1 on the right: (1 + 2 + 1) - 0 = 4;
    # the border columns reflect onto equal values: 0
    np.testing.assert_allclose(radar.sobel(step[None])[0], np.tile([0.0, 4.0, 4.0, 0.0], (4, 1)))
    ramp = np.tile(np.arange(4.0), (4, 1))
    # interior: 4 * (j+1 - (j-1)) = 8; borders reflect the edge pixel: 4 * 1 = 4
    np.testing.assert_allclose(radar.sobel(ramp[None])[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)))
    np.testing.assert_allclose(radar.sobel(ramp.T[None])[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)).T)
    d_row, d_col = radar.sobel_xy(ramp[None])
    np.testing.assert_allclose(d_row, 0.0)
    np.testing.assert_allclose(d_col[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)))


@pytest.mark.parametrize("shape", [(5, 7), (1, 4), (9, 3)])
def test_sobel_matches_scipy_reflect(shape):
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3,) + shape)
    d_row, d_col = radar.sobel_xy(maps)
    magnitude = radar.sobel(maps)
    for i, m in enumerate(maps):
        gy = scipy.ndimage.sobel(m, axis=0, mode="reflect")
        gx = scipy.ndimage.sobel(m, axis=1, mode="reflect")
        np.testing.assert_allclose(d_row[i], gy, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_col[i], gx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(magnitude[i], np.hypot(gx, gy), rtol=1e-5, atol=1e-5)


def test_features_by_hand():
    s = np.zeros((2, 4, 4), np.float32)
    s[0, 0, 0], s[0, 0, 1], s[0, 3, 3] = 3.0, 4.0, 1.0
    s[1] = 1.0
    f = np.asarray(radar.features(s, patch=2, stride=2))
    assert f.shape == (2, 2)
    np.testing.assert_allclose(f[0], [np.sqrt(26.0), 5.0], rtol=1e-6)  # patch (0,0): sqrt(9 + 16)
    np.testing.assert_allclose(f[1], [4.0, 2.0], rtol=1e-6)  # sqrt(16), sqrt(4)
    # non-dividing stride: patches at 0 and 1 (shifted to the border) along each axis
    f3 = np.asarray(radar.features(s[:, :3, :3], patch=2, stride=2))
    np.testing.assert_allclose(f3[0], [5.0, 5.0], rtol=1e-6)


# ----------------------------------------------------------------------------- patches

def test_origins_and_coverage_by_hand():
    np.testing.assert_array_equal(radar.patch_origins_1d(5, 3, 2), [0, 2])
    np.testing.assert_array_equal(radar.patch_origins_1d(6, 3, 2), [0, 2, 3])  # last shifted to the border
    np.testing.assert_array_equal(radar.patch_origins_1d(4, 4, 1), [0])
    origins = radar.patch_origins(5, 6, 3, 2)
    assert origins.shape == (6, 2)
    counts = radar.coverage(origins, 3, 5, 6)
    np.testing.assert_array_equal(counts, np.outer([1, 1, 2, 1, 1], [1, 1, 2, 2, 2, 1]))


@pytest.mark.parametrize("h, w, patch, stride", [(8, 8, 4, 4), (8, 8, 4, 2), (7, 9, 3, 2), (10, 6, 4, 3),
                                                 (5, 5, 5, 1), (6, 11, 5, 5), (9, 13, 4, 3)])
def test_extract_then_stitch_is_identity(h, w, patch, stride):
    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((2, h, w, 1)).astype(np.float32)
    patches, origins = radar.extract_patches(x, patch, stride)
    assert patches.shape == (2, len(origins), patch, patch, 1)
    for k, (oy, ox) in enumerate(origins):
        np.testing.assert_array_equal(patches[:, k], x[:, oy:oy + patch, ox:ox + patch])
    np.testing.assert_allclose(radar.stitch(patches[..., 0], origins, h, w), x[..., 0], rtol=1e-6)
    np.testing.assert_allclose(radar.stitch(np.ones(patches.shape[:-1]), origins, h, w), 1.0, rtol=1e-6)
    assert radar.coverage(origins, patch, h, w).min() >= 1


def test_stitch_averages_overlaps():
    origins = radar.patch_origins(1 * 3, 4, 3, 1)  # rows [0], cols [0, 1]
    maps = np.stack([np.full((3, 3), 2.0), np.full((3, 3), 4.0)])[None]
    out = np.asarray(radar.stitch(maps, origins, 3, 4))
    np.testing.assert_allclose(out[0], np.tile([2.0, 3.0, 3.0, 4.0], (3, 1)))


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_monotone_in_unit_interval(kind):
    ab = radar.ddpm_schedule(kind, 1000)
    assert ab.shape == (1000,)
    assert np.all((ab > 0) & (ab < 1))
    assert np.all(np.diff(ab) < 0)


def test_linear_schedule_endpoints_match_betas():
    ab = radar.ddpm_schedule("linear", 1000)
    assert ab[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    assert ab[1] / ab[0] == pytest.approx(1 - (1e-4 + (0.02 - 1e-4) / 999), rel=1e-12)
    assert ab[-1] / ab[-2] == pytest.approx(1 - 0.02, rel=1e-12)
    assert ab[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-12)
    betas = radar.ddpm_betas("cosine", 1000)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)


# ----------------------------------------------------------------------------- Isolation Forest

def _blob_features(seed, n, center=(10.0, 12.0), scale=0.5):
    return np.random.default_rng(seed).normal(center, scale, (n, 2))


def test_forest_is_fitted_on_normals_only():
    assert list(inspect.signature(radar.fit_forest).parameters) == ["features_normal", "radar_config"]
    cfg = RadarConfig(n_estimators=50, contamination=0.05)
    train_normal = _blob_features(0, 200)
    test_normal = _blob_features(1, 40)
    test_anomal = _blob_features(2, 10, center=(16.0, 20.0))
    test = np.concatenate([test_normal, test_anomal])
    labels = np.r_[np.zeros(40), np.ones(10)].astype(int)

    forest = radar.fit_forest(train_normal, cfg)
    pred, scores = radar.forest_predict(forest, test)
    assert pred[40:].all()  # far-away features are flagged
    assert pred[:40].mean() < 0.25
    np.testing.assert_array_equal(pred, (scores > 0).astype(int))
    # the threshold comes from the training normals: about `contamination` of them flagged
    assert radar.forest_predict(forest, train_normal)[0].mean() == pytest.approx(0.05, abs=0.02)

    # decisions per image do not depend on the other test images or on their labels
    perm = np.random.default_rng(3).permutation(len(test))
    pred_p, scores_p = radar.forest_predict(forest, test[perm])
    np.testing.assert_array_equal(pred_p, pred[perm])
    np.testing.assert_array_equal(scores_p, scores[perm])
    pred_n, scores_n = radar.forest_predict(forest, test[labels == 0])
    np.testing.assert_array_equal(scores_n, scores[:40])

    # a forest refitted on the same normals is identical; one fitted on test data
    # (anomalies included) would give other decisions
    np.testing.assert_array_equal(radar.forest_predict(radar.fit_forest(train_normal, cfg), test)[1], scores)
    leaky = radar.fit_forest(np.concatenate([train_normal, test]), cfg)
    assert not np.allclose(radar.forest_predict(leaky, test)[1], scores)

    restored = radar.forest_from_bytes(radar.forest_to_bytes(forest))
    np.testing.assert_array_equal(radar.forest_predict(restored, test)[1], scores)
    auto = radar.fit_forest(train_normal, dataclasses.replace(cfg, contamination="auto"))
    assert radar.forest_predict(auto, test)[0][40:].all()


def test_radar_metrics_by_hand():
    m = radar.radar_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    none = radar.radar_metrics([0, 1], [0, 0])
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0
    # tp 3, fp 2, fn 0: F1 = 6 / 8 exactly, as the thresholded F1 of the same decisions
    # (2PR / (P + R) with P = 0.6 rounds to 0.7499999999999999)
    labels, decided = [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]
    assert radar.radar_metrics(labels, decided)["f1"] == 0.75
    assert metrics.thresholded_metrics(np.array(decided, np.float32), labels, 1.0)["f1"] == 0.75


# ----------------------------------------------------------------------------- eps objective

def test_eps_loss_time_convention_with_oracle():
    """x0 = 0 makes x_t = sqrt(1 - ab_t) eps: an oracle that reads t as t_int / num_steps
    recovers eps exactly, so the loss is 0; a wrong t convention would not."""
    ab = jnp.asarray(radar.ddpm_schedule("linear", 1000), jnp.float32)

    def oracle(params, x, t, dropout_key):
        idx = jnp.round(t * 1000).astype(jnp.int32)
        return x / jnp.sqrt(1 - ab[idx])[:, None, None, None]

    zero = lambda p, x, t, k: jnp.zeros_like(x)
    losses = jax.jit(lambda x0, key: (radar.eps_loss(oracle, None, x0, key, ab, None),
                                      radar.eps_loss(zero, None, x0, key, ab, None)))
    exact, trivial = losses(jnp.zeros((16, 4, 4, 3)), jax.random.PRNGKey(0))
    assert float(exact) < 1e-8
    assert float(trivial) == pytest.approx(1.0, abs=0.1)  # E[eps^2] = 1


TINY_NET = NetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_rates=(2,),
                     num_head_channels=8, dropout=0.0, num_groups=4)


def test_eps_loss_falls_on_tiny_data():
    base = PRESETS["tiny"]
    config = base.replace(net=TINY_NET, train=dataclasses.replace(base.train, batch_size=16, learning_rate=2e-3,
                                                                  warmup_steps=0, ema_decay=0.9))
    rc = RadarConfig(patch_size=8, patch_stride=4)
    _, xx = np.mgrid[:16, :16]
    images = np.stack([((np.sin(xx / 2.0 + k) + 1) * 127.5)[..., None] for k in range(16)]).astype(np.uint8)
    state, losses = radar.train_radar(config, rc, images, steps=30, key=jax.random.PRNGKey(0))
    assert losses.shape == (30,) and np.all(np.isfinite(losses))
    assert int(state.step) == 30
    assert losses[-8:].mean() < 0.6 * losses[:8].mean()


def test_ema_follows_its_formula():
    """The RADAR step's EMA after k steps: the warm-up EMA of the params after each step
    (a four-parameter elementwise field stands in for the U-Net)."""
    base = PRESETS["tiny"]
    config = base.replace(train=dataclasses.replace(base.train, learning_rate=0.05, ema_decay=0.9))
    rc = RadarConfig(patch_size=4, patch_stride=4)
    params = AffineField.init()
    state = fm_train.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                                opt_state=fm_train.make_optimizer(config.train).init(params))
    step = jax.jit(lambda s, x, k: radar.radar_train_step(s, x, k, module=AffineField, config=config,
                                                          radar_config=rc))
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    trajectory = []
    for _ in range(6):
        state, _ = step(state, images, jax.random.PRNGKey(1))
        trajectory.append(jax.device_get(state.params))
    expected = ema_reference(jax.device_get(params), trajectory, 0.9)
    for name in AffineField.names:
        assert float(state.ema_params[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert any(abs(float(state.ema_params[n]) - float(state.params[n])) > 1e-3 for n in AffineField.names)


# ----------------------------------------------------------------------------- scorer

def toy_apply(params, x, t, y=None):
    """A position-independent, time-dependent nonlinear stand-in for the U-Net."""
    shifted = jnp.roll(x, 1, axis=1)
    return params["a"] * jnp.tanh(x) + params["b"] * shifted * t[:, None, None, None]


PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(-1.3)}


def loop_reference(images_u8, noise, rc):
    """Plain numpy: patch by patch, then scipy Sobel and hand-written features."""
    ab = radar.ddpm_schedule(rc.schedule, rc.num_steps)[rc.t_score]
    out_maps, out_feats = [], []
    h, w = images_u8.shape[1:3]
    origins = radar.patch_origins(h, w, rc.patch_size, rc.patch_stride)
    p = rc.patch_size
    for img in np.asarray(to_model_range(images_u8)):
        total, counts = np.zeros((h, w)), np.zeros((h, w))
        for k, (oy, ox) in enumerate(origins):
            x_t = np.sqrt(ab) * img[oy:oy + p, ox:ox + p] + np.sqrt(1 - ab) * noise[k]
            eps_hat = np.asarray(toy_apply(PARAMS, jnp.asarray(x_t[None]), jnp.asarray([rc.t_score / rc.num_steps])))[0]
            d = eps_hat - noise[k] if rc.map_kind == "eps_diff" else eps_hat
            r = np.sqrt((d ** 2).sum(-1)) if rc.channel_reduce == "l2" else np.abs(d).mean(-1)
            total[oy:oy + p, ox:ox + p] += r
            counts[oy:oy + p, ox:ox + p] += 1
        m = total / counts
        s = np.hypot(scipy.ndimage.sobel(m, 0, mode="reflect"), scipy.ndimage.sobel(m, 1, mode="reflect"))
        local = max(np.sqrt((s[oy:oy + p, ox:ox + p] ** 2).sum()) for oy, ox in origins)
        out_maps.append(s)
        out_feats.append([np.sqrt((s ** 2).sum()), local])
    return np.stack(out_maps), np.array(out_feats)


@pytest.mark.parametrize("map_kind, reduce", [("eps_diff", "l2"), ("eps_hat", "mean_abs")])
def test_scorer_equals_patch_loop(map_kind, reduce):
    rc = RadarConfig(patch_size=4, patch_stride=3, t_score=300, map_kind=map_kind, channel_reduce=reduce,
                     image_batch=2)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 9, 10, 2), dtype=np.uint8)
    scorer = radar.RadarScorer(toy_apply, rc, (9, 10, 2))
    assert scorer.noise.shape == (len(scorer.origins), 4, 4, 2)
    maps, feats = scorer.score(PARAMS, images)
    ref_maps, ref_feats = loop_reference(images, np.asarray(scorer.noise), rc)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-4, atol=1e-4)


def test_scorer_same_image_same_score_and_no_recompile():
    rc = RadarConfig(patch_size=4, patch_stride=2, image_batch=2, sobel_smooth_sigma=1.0)
    scorer = radar.RadarScorer(toy_apply, rc, (8, 8, 1))
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    maps, feats = scorer.score(PARAMS, images)
    maps_r, feats_r = scorer.score(PARAMS, images[::-1])
    np.testing.assert_array_equal(feats_r[::-1], feats)
    np.testing.assert_array_equal(maps_r[::-1], maps)
    one = scorer.score(PARAMS, images[2:3])[1]
    np.testing.assert_array_equal(one[0], feats[2])
    for n in (1, 3, 7):
        scorer.score(PARAMS, rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    assert scorer._fn._cache_size() == 1
    assert scorer.score(PARAMS, images[:0])[1].shape == (0, 2)


def test_bad_inputs_raise_one_line_value_errors():
    bad = [
        lambda: radar.RadarScorer(toy_apply, RadarConfig(patch_size=16), (8, 8, 1)),
        lambda: radar.RadarScorer(toy_apply, RadarConfig(patch_size=4, patch_stride=0), (8, 8, 1)),
        lambda: radar.extract_patches(np.zeros((1, 4, 4, 1)), 5, 1),
        lambda: radar.extract_patches(np.zeros((1, 9, 9, 1)), 4, 5),  # would leave gaps
        lambda: radar.ddpm_schedule("sigmoid", 1000),
        lambda: radar.validate_radar_config(RadarConfig(schedule="quadratic")),
        lambda: radar.validate_radar_config(RadarConfig(t_score=1000)),
        lambda: radar.validate_radar_config(RadarConfig(map_kind="x0")),
        lambda: radar.validate_radar_config(RadarConfig(contamination=0.7)),
        lambda: radar.validate_radar_config(RadarConfig(contamination="sometimes")),
        lambda: radar.validate_radar_config(RadarConfig(patch_size=6), net=NetConfig(channel_mult=(1, 2, 2))),
        lambda: radar.RadarScorer(toy_apply, RadarConfig(patch_size=4), (8, 8, 1)).score(PARAMS, np.zeros((1, 8, 9, 1))),
    ]
    for make in bad:
        with pytest.raises(ValueError) as err:
            make()
        assert "\n" not in str(err.value) and str(err.value)


def test_network_calls_per_image():
    assert radar.network_calls_per_image(RadarConfig(patch_size=32, patch_stride=16), (64, 64)) == 9
    assert radar.network_calls_per_image(RadarConfig(patch_size=32, patch_stride=16), (72, 64, 3)) == 12
