"""RADAR: schedule, patches/stitching, Sobel, features, forest, eps objective, scorer."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from references import AffineField, ema_reference

from fmjax.config import build
from fmjax.eval import metrics
from fmjax.errors import RunError
from fmjax.flow import to_model_range
from fmjax.methods.base import Fitted
from fmjax.methods.radar import ddpm
from fmjax.methods.radar import patches as radar_patches
from fmjax.methods.radar import scorer as radar_scorer_lib
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar import method as radar_method
from fmjax.methods.radar.settings import RadarSettings as RadarConfig
from fmjax.methods.radar.settings import validate_settings

# ----------------------------------------------------------------------------- Sobel

def test_sobel_step_edge_and_ramp_by_hand():
    step = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (4, 1))
    # columns 1 and 2 see 0 on the left and 1 on the right: (1 + 2 + 1) - 0 = 4;
    # the border columns reflect onto equal values: 0
    np.testing.assert_allclose(radar_scorer_lib.sobel(step[None])[0], np.tile([0.0, 4.0, 4.0, 0.0], (4, 1)))
    ramp = np.tile(np.arange(4.0), (4, 1))
    # interior: 4 * (j+1 - (j-1)) = 8; borders reflect the edge pixel: 4 * 1 = 4
    np.testing.assert_allclose(radar_scorer_lib.sobel(ramp[None])[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)))
    np.testing.assert_allclose(radar_scorer_lib.sobel(ramp.T[None])[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)).T)
    d_row, d_col = radar_scorer_lib.sobel_xy(ramp[None])
    np.testing.assert_allclose(d_row, 0.0)
    np.testing.assert_allclose(d_col[0], np.tile([4.0, 8.0, 8.0, 4.0], (4, 1)))


@pytest.mark.parametrize("shape", [(5, 7), (1, 4), (9, 3)])
def test_sobel_matches_scipy_reflect(shape):
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3,) + shape)
    d_row, d_col = radar_scorer_lib.sobel_xy(maps)
    magnitude = radar_scorer_lib.sobel(maps)
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
    f = np.asarray(radar_scorer_lib.features(s, patch=2, stride=2))
    assert f.shape == (2, 2)
    np.testing.assert_allclose(f[0], [np.sqrt(26.0), 5.0], rtol=1e-6)  # patch (0,0): sqrt(9 + 16)
    np.testing.assert_allclose(f[1], [4.0, 2.0], rtol=1e-6)  # sqrt(16), sqrt(4)
    # non-dividing stride: patches at 0 and 1 (shifted to the border) along each axis
    f3 = np.asarray(radar_scorer_lib.features(s[:, :3, :3], patch=2, stride=2))
    np.testing.assert_allclose(f3[0], [5.0, 5.0], rtol=1e-6)


# ----------------------------------------------------------------------------- patches

def test_origins_and_coverage_by_hand():
    np.testing.assert_array_equal(radar_patches.patch_origins_1d(5, 3, 2), [0, 2])
    np.testing.assert_array_equal(radar_patches.patch_origins_1d(6, 3, 2), [0, 2, 3])  # last shifted to the border
    np.testing.assert_array_equal(radar_patches.patch_origins_1d(4, 4, 1), [0])
    origins = radar_patches.patch_origins(5, 6, 3, 2)
    assert origins.shape == (6, 2)
    counts = radar_patches.coverage(origins, 3, 5, 6)
    np.testing.assert_array_equal(counts, np.outer([1, 1, 2, 1, 1], [1, 1, 2, 2, 2, 1]))


@pytest.mark.parametrize("h, w, patch, stride", [(8, 8, 4, 4), (8, 8, 4, 2), (7, 9, 3, 2), (10, 6, 4, 3),
                                                 (5, 5, 5, 1), (6, 11, 5, 5), (9, 13, 4, 3)])
def test_extract_then_stitch_is_identity(h, w, patch, stride):
    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((2, h, w, 1)).astype(np.float32)
    patches, origins = radar_patches.extract_patches(x, patch, stride)
    assert patches.shape == (2, len(origins), patch, patch, 1)
    for k, (oy, ox) in enumerate(origins):
        np.testing.assert_array_equal(patches[:, k], x[:, oy:oy + patch, ox:ox + patch])
    np.testing.assert_allclose(radar_patches.stitch(patches[..., 0], origins, h, w), x[..., 0], rtol=1e-6)
    np.testing.assert_allclose(radar_patches.stitch(np.ones(patches.shape[:-1]), origins, h, w), 1.0, rtol=1e-6)
    assert radar_patches.coverage(origins, patch, h, w).min() >= 1


def test_stitch_averages_overlaps():
    origins = radar_patches.patch_origins(1 * 3, 4, 3, 1)  # rows [0], cols [0, 1]
    maps = np.stack([np.full((3, 3), 2.0), np.full((3, 3), 4.0)])[None]
    out = np.asarray(radar_patches.stitch(maps, origins, 3, 4))
    np.testing.assert_allclose(out[0], np.tile([2.0, 3.0, 3.0, 4.0], (3, 1)))


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_monotone_in_unit_interval(kind):
    ab = ddpm.ddpm_schedule(kind, 1000)
    assert ab.shape == (1000,)
    assert np.all((ab > 0) & (ab < 1))
    assert np.all(np.diff(ab) < 0)


def test_linear_schedule_endpoints_match_betas():
    ab = ddpm.ddpm_schedule("linear", 1000)
    assert ab[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    assert ab[1] / ab[0] == pytest.approx(1 - (1e-4 + (0.02 - 1e-4) / 999), rel=1e-12)
    assert ab[-1] / ab[-2] == pytest.approx(1 - 0.02, rel=1e-12)
    assert ab[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-12)
    betas = ddpm.ddpm_betas("cosine", 1000)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)


# ----------------------------------------------------------------------------- Isolation Forest

def _blob_features(seed, n, center=(10.0, 12.0), scale=0.5):
    return np.random.default_rng(seed).normal(center, scale, (n, 2))


def _labels_and_scores(forest, feats):
    scores = forest_lib.score(forest, feats)
    return (scores > 0).astype(int), scores


def test_forest_is_fitted_on_normals_only():
    cfg = RadarConfig(n_estimators=50, contamination=0.05)
    train_normal = _blob_features(0, 200)
    test_normal = _blob_features(1, 40)
    test_anomal = _blob_features(2, 10, center=(16.0, 20.0))
    test = np.concatenate([test_normal, test_anomal])
    labels = np.r_[np.zeros(40), np.ones(10)].astype(int)

    forest = forest_lib.fit(train_normal, cfg)
    pred, scores = _labels_and_scores(forest, test)
    assert pred[40:].all()  # far-away features are flagged
    assert pred[:40].mean() < 0.25
    # the threshold comes from the training normals: about `contamination` of them flagged
    assert _labels_and_scores(forest, train_normal)[0].mean() == pytest.approx(0.05, abs=0.02)

    # decisions per image do not depend on the other test images or on their labels
    perm = np.random.default_rng(3).permutation(len(test))
    pred_p, scores_p = _labels_and_scores(forest, test[perm])
    np.testing.assert_array_equal(pred_p, pred[perm])
    np.testing.assert_array_equal(scores_p, scores[perm])
    np.testing.assert_array_equal(_labels_and_scores(forest, test[labels == 0])[1], scores[:40])

    # a forest refitted on the same normals is identical; one fitted on test data
    # (anomalies included) would give other decisions
    np.testing.assert_array_equal(forest_lib.score(forest_lib.fit(train_normal, cfg), test), scores)
    leaky = forest_lib.fit(np.concatenate([train_normal, test]), cfg)
    assert not np.allclose(forest_lib.score(leaky, test), scores)
    auto = forest_lib.fit(train_normal, dataclasses.replace(cfg, contamination="auto"))
    assert _labels_and_scores(auto, test)[0][40:].all()


@pytest.mark.parametrize("contamination,max_samples", [(0.05, 0), ("auto", 0), (0.1, 64)])
def test_forest_arrays_score_exactly_as_sklearn(contamination, max_samples):
    from sklearn.ensemble import IsolationForest

    cfg = RadarConfig(n_estimators=60, contamination=contamination, max_samples=max_samples, forest_seed=3,
                      one_sided=False)  # the paper's two-sided forest, as scikit-learn fits it
    train = _blob_features(4, 300)
    test = np.concatenate([_blob_features(5, 100), _blob_features(6, 50, scale=3.0)])
    model = IsolationForest(n_estimators=60, contamination=contamination, max_samples=max_samples or "auto",
                            random_state=3).fit(train)
    want = (-model.decision_function(test)).astype(np.float32)
    forest = forest_lib.fit(train, cfg)
    np.testing.assert_array_equal(forest_lib.score(forest, test), want)
    np.testing.assert_array_equal(forest_lib.score(forest, test) > 0, model.predict(test) == -1)
    # stored as JSON values and arrays, read back: the same forest
    values, arrays = forest_lib.to_fitted(forest)
    restored = forest_lib.from_fitted(Fitted(values=json.loads(json.dumps(values)), arrays=arrays))
    np.testing.assert_array_equal(forest_lib.score(restored, test), want)


def test_damaged_or_crafted_forest_arrays_are_refused():
    values, arrays = forest_lib.to_fitted(forest_lib.fit(_blob_features(0, 100), RadarConfig(n_estimators=5)))

    def refused(**changes):
        new = dict(arrays)
        new.update({k: v for k, v in changes.items() if k in arrays})
        vals = {**values, **{k: v for k, v in changes.items() if k not in arrays}}
        with pytest.raises(RunError) as err:
            forest_lib.from_fitted(Fitted(values=vals, arrays={k: v for k, v in new.items() if v is not None}))
        assert "\n" not in str(err.value)

    left = arrays["forest_children_left"].copy()
    left[0] = 0  # the root its own child: a walk would never end
    refused(forest_children_left=left)
    right = arrays["forest_children_right"].copy()
    right[0] = 10 ** 6
    refused(forest_children_right=right)
    refused(forest_tree_starts=arrays["forest_tree_starts"][:-1])
    refused(forest_threshold=arrays["forest_threshold"].astype(np.int64))
    refused(forest_feature=None)
    refused(forest_tree_features=arrays["forest_tree_features"] + 5)
    refused(forest_offset="nan")
    with pytest.raises(RunError, match="no Isolation Forest"):
        forest_lib.from_fitted(Fitted())


def test_radar_metrics_by_hand():
    m = radar_method.radar_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    none = radar_method.radar_metrics([0, 1], [0, 0])
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0
    # tp 3, fp 2, fn 0: F1 = 6 / 8 exactly, as the thresholded F1 of the same decisions
    # (2PR / (P + R) with P = 0.6 rounds to 0.7499999999999999)
    labels, decided = [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]
    assert radar_method.radar_metrics(labels, decided)["f1"] == 0.75
    assert metrics.thresholded_metrics(np.array(decided, np.float32), labels, 1.0)["f1"] == 0.75


# ----------------------------------------------------------------------------- eps objective

def test_eps_loss_time_convention_with_oracle():
    """x0 = 0 makes x_t = sqrt(1 - ab_t) eps: an oracle that reads t as t_int / num_steps
    recovers eps exactly, so the loss is 0; a wrong t convention would not."""
    ab = np.asarray(ddpm.ddpm_schedule("linear", 1000), np.float32)

    def oracle(params, x, t, y):
        idx = jnp.round(t * 1000).astype(jnp.int32)
        return x / jnp.sqrt(1 - jnp.asarray(ab)[idx])[:, None, None, None]

    zero = lambda p, x, t, y: jnp.zeros_like(x)

    def losses(x0, key):
        noise = ddpm.draw_noise(key, x0.shape, 1000)
        return tuple(ddpm.eps_loss(None, x0, noise, None, f, ab) for f in (oracle, zero))

    exact, trivial = jax.jit(losses)(jnp.zeros((16, 4, 4, 3)), jax.random.PRNGKey(0))
    assert float(exact) < 1e-8
    assert float(trivial) == pytest.approx(1.0, abs=0.1)  # E[eps^2] = 1


# the tiny preset's network with dropout, batch 16 on 8x8 patches with flips
RADAR = build("tiny", "radar", ["train.batch_size=16", "train.learning_rate=2e-3", "train.ema_decay=0.9",
                                "train.hflip=true", "net.dropout=0.1"])
STRIPES = np.stack([((np.sin(np.mgrid[:16, :16][1] / 2.0 + k) + 1) * 127.5)[..., None]
                    for k in range(16)]).astype(np.uint8)


def _train_radar(run_dir, steps, devices=None):
    """(state, losses) of RADAR's objective through the shared training loop."""
    from fmjax.training.loop import train

    config = RADAR.replace(train=dataclasses.replace(RADAR.train, steps=steps, log_every=1))
    method = radar_method.METHOD
    state = train(config, method.objective(config), STRIPES, str(run_dir), progress=False, devices=devices,
                  init_shape=method.init_shape(config, STRIPES.shape[1:]))
    return state, np.array([json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").open()])


def test_eps_loss_falls_on_tiny_data_in_the_shared_loop(tmp_path):
    state, losses = _train_radar(tmp_path / "run", 30)
    assert losses.shape == (30,) and np.all(np.isfinite(losses))
    assert int(state.step) == 30
    assert losses[-8:].mean() < 0.6 * losses[:8].mean()
    # params initialised at the patch shape: the U-Net is fully convolutional
    assert radar_method.METHOD.init_shape(RADAR, (16, 16, 1)) == (8, 8, 1)


def test_ema_follows_its_formula():
    """The RADAR objective's step: the EMA after k steps is the warm-up EMA of the params
    after each step (a four-parameter elementwise field stands in for the U-Net)."""
    import jax
    import jax.numpy as jnp

    from fmjax.training.state import TrainState, make_optimizer
    from fmjax.training.step import train_step

    config = build("tiny", "radar", ["train.learning_rate=0.05", "train.ema_decay=0.9", "score.patch_size=4",
                                     "score.patch_stride=4"])
    params = AffineField.init()
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                       opt_state=make_optimizer(config.train).init(params))
    objective = radar_method.METHOD.objective(config)
    step = jax.jit(lambda s, x, k: train_step(s, x, jnp.zeros(len(x), jnp.int32), k, objective=objective,
                                              module=AffineField, config=config))
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    trajectory = []
    for _ in range(6):
        state, _ = step(state, images, jax.random.PRNGKey(1))
        trajectory.append(jax.device_get(state.params))
    expected = ema_reference(jax.device_get(params), trajectory, 0.9)
    for name in AffineField.names:
        assert float(state.ema_params[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert any(abs(float(state.ema_params[n]) - float(state.params[n])) > 1e-3 for n in AffineField.names)


def test_radar_trains_alike_on_one_and_two_devices(tmp_path):
    """RADAR's objective through the shared data-parallel step (global-batch draws,
    per-device gradients summed): two devices give one device's parameters."""
    import jax

    one, _ = _train_radar(tmp_path / "one", 2, jax.local_devices()[:1])
    two, _ = _train_radar(tmp_path / "two", 2, jax.local_devices()[:2])
    assert len(jax.tree.leaves(two.params)[0].sharding.device_set) == 2
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- scorer

def toy_apply(params, x, t, y=None):
    """A position-independent, time-dependent nonlinear stand-in for the U-Net."""
    shifted = jnp.roll(x, 1, axis=1)
    return params["a"] * jnp.tanh(x) + params["b"] * shifted * t[:, None, None, None]


PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(-1.3)}


def loop_reference(images_u8, noise, rc):
    """Plain numpy: patch by patch, then scipy Sobel and hand-written features."""
    ab = ddpm.ddpm_schedule(rc.schedule, rc.num_steps)[rc.t_score]
    out_maps, out_feats = [], []
    h, w = images_u8.shape[1:3]
    origins = radar_patches.patch_origins(h, w, rc.patch_size, rc.patch_stride)
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
        if rc.sobel_smooth_sigma > 0:
            m = scipy.ndimage.gaussian_filter(m, rc.sobel_smooth_sigma, mode="reflect")
        s = np.hypot(scipy.ndimage.sobel(m, 0, mode="reflect"), scipy.ndimage.sobel(m, 1, mode="reflect"))
        local = max(np.sqrt((s[oy:oy + p, ox:ox + p] ** 2).sum()) for oy, ox in origins)
        out_maps.append(s)
        out_feats.append([np.sqrt((s ** 2).sum()), local])
    return np.stack(out_maps), np.array(out_feats)


@pytest.mark.parametrize("map_kind, reduce, blur", [("eps_diff", "l2", 0.0), ("eps_hat", "mean_abs", 0.0),
                                                  ("eps_diff", "l2", 4.0)])
def test_scorer_equals_patch_loop(map_kind, reduce, blur):
    rc = RadarConfig(patch_size=4, patch_stride=3, t_score=300, map_kind=map_kind, channel_reduce=reduce,
                     image_batch=2, sobel_smooth_sigma=blur, map_feature=False)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 9, 10, 2), dtype=np.uint8)
    radar_scorer = radar_scorer_lib.RadarScorer(toy_apply, rc, (9, 10, 2))
    assert radar_scorer.noise.shape == (len(radar_scorer.origins), 4, 4, 2)
    maps, feats = radar_scorer.maps_and_features(PARAMS, images)
    ref_maps, ref_feats = loop_reference(images, np.asarray(radar_scorer.noise), rc)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-4, atol=1e-4)


def test_scorer_same_image_same_score_and_no_recompile():
    rc = RadarConfig(t_score=250, patch_size=4, patch_stride=2, image_batch=2, sobel_smooth_sigma=1.0,
                     map_feature=False)
    radar_scorer = radar_scorer_lib.RadarScorer(toy_apply, rc, (8, 8, 1))
    score = radar_scorer.maps_and_features
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    maps, feats = score(PARAMS, images)
    maps_r, feats_r = score(PARAMS, images[::-1])
    np.testing.assert_array_equal(feats_r[::-1], feats)
    np.testing.assert_array_equal(maps_r[::-1], maps)
    one = score(PARAMS, images[2:3])[1]
    np.testing.assert_array_equal(one[0], feats[2])
    for n in (1, 3, 7):
        score(PARAMS, rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    assert radar_scorer._batches.fn._cache_size() == 1
    assert score(PARAMS, images[:0])[1].shape == (0, 2)


def test_bad_inputs_raise_one_line_value_errors():
    bad = [
        lambda: radar_scorer_lib.RadarScorer(toy_apply, RadarConfig(patch_size=16), (8, 8, 1)),
        lambda: radar_scorer_lib.RadarScorer(toy_apply, RadarConfig(patch_size=4, patch_stride=0), (8, 8, 1)),
        lambda: radar_patches.extract_patches(np.zeros((1, 4, 4, 1)), 5, 1),
        lambda: radar_patches.extract_patches(np.zeros((1, 9, 9, 1)), 4, 5),  # would leave gaps
        lambda: ddpm.ddpm_schedule("sigmoid", 1000),
        lambda: validate_settings(RadarConfig(schedule="quadratic")),
        lambda: validate_settings(RadarConfig(t_score=1000)),
        lambda: validate_settings(RadarConfig(map_kind="x0")),
        lambda: validate_settings(RadarConfig(contamination=0.7)),
        lambda: validate_settings(RadarConfig(contamination="sometimes")),
        lambda: validate_settings(RadarConfig(patch_size=6), channel_mult=(1, 2, 2)),
        lambda: radar_scorer_lib.RadarScorer(toy_apply, RadarConfig(patch_size=4), (8, 8, 1)).maps_and_features(
            PARAMS, np.zeros((1, 8, 9, 1))),
    ]
    for make in bad:
        with pytest.raises(ValueError) as err:
            make()
        assert "\n" not in str(err.value) and str(err.value)


def test_forest_is_fitted_on_exactly_the_held_out_normals(monkeypatch):
    """The network trained on train_images minus the held-out slice: the forest sees only
    the held-out images' features (training images' noise errors are lower than an unseen
    normal's), and falls back to the training images, saying so, when none are held out."""
    import types

    from fmjax.data.base import Split

    rc = RadarConfig(t_score=250, sobel_smooth_sigma=1.0, patch_size=4, patch_stride=2, n_estimators=10, image_batch=2)
    scorer = radar_scorer_lib.RadarScorer(toy_apply, rc, (8, 8, 1))
    config = build("tiny", "radar", [])
    run = types.SimpleNamespace(scorer=scorer, params=PARAMS, config=dataclasses.replace(config, score=rc))
    rng = np.random.default_rng(4)
    train = rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)
    held = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)

    def normals(images, prefix):
        n = len(images)
        return Split(images=images, masks=np.zeros((n, 8, 8), np.uint8), labels=np.zeros(n, np.int32),
                     names=tuple(f"{prefix}{i}" for i in range(n)), defect_types=("good",) * n,
                     original_sizes=np.full((n, 2), 8, np.int32))

    trained, holdout = normals(train, "t"), normals(held, "h")
    seen = []
    real_fit = forest_lib.fit
    monkeypatch.setattr(forest_lib, "fit", lambda feats, settings: seen.append(np.array(feats)) or
                        real_fit(feats, settings))

    fitted = radar_method.METHOD.fit(run, trained, holdout)
    held_maps, held_feats = scorer.maps_and_features(PARAMS, held)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], held_feats)
    assert fitted.values["forest_fitted_on"] == "held_out_normals" and fitted.values["num_forest_images"] == 4
    assert fitted.values["num_normal_images"] == 4 and fitted.values["image_threshold"] == 0.0
    assert fitted.values["pixel_threshold"] == pytest.approx(np.quantile(held_maps, config.calibration.pixel_threshold_quantile))
    forest = forest_lib.from_fitted(fitted)
    np.testing.assert_array_equal(forest_lib.score(forest, held_feats),
                                  forest_lib.score(real_fit(held_feats, rc), held_feats))

    seen.clear()
    fallback = radar_method.METHOD.fit(run, trained, None)
    np.testing.assert_array_equal(seen[0], scorer.maps_and_features(PARAMS, train)[1])
    assert fallback.values["forest_fitted_on"] == "training_images" and fallback.values["num_forest_images"] == 9
    assert "pixel_threshold" not in fallback.values
