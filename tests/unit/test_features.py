"""Image scores from the network's own features (score.feature_knn,
fmjax/methods/image_bank.py; Flow Mismatching's in fmjax/methods/flow_mismatch/features.py),
checked against numpy."""
import dataclasses
import types

import jax
import numpy as np
import pytest

from fmjax import config as config_lib
from fmjax.data import Split
from fmjax.errors import ScoreRuleError
from fmjax.methods import image_bank
from fmjax.methods.base import Fitted
from fmjax.methods.flow_mismatch import features as feat
from fmjax.methods.flow_mismatch import method as fm_method
from fmjax.methods.flow_mismatch.settings import Settings
from fmjax.nets import unet

SHAPE = (16, 16, 1)
CONFIG = config_lib.preset("tiny")
SETTINGS = Settings(num_paths=2, num_times=2, aggregate="mean", feature_knn=3, feature_bank=6, chunk_size=4,
                    image_batch=1)


@pytest.fixture(scope="module")
def network():
    module, params = unet.create(CONFIG.net, SHAPE, jax.random.PRNGKey(0))
    _, apply_fn = unet.build_model(CONFIG.net, SHAPE)
    return module, params, apply_fn


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n,) + SHAPE, dtype=np.uint8)


def numpy_knn(features, bank_features, k):
    mean, std = bank_features.mean(0), np.maximum(bank_features.std(0), 1e-6)
    z, b = (features - mean) / std, (bank_features - mean) / std
    d2 = ((z[:, None, :] - b[None]) ** 2).sum(-1)
    return np.sort(d2, axis=1)[:, :k].mean(1)


def test_knn_scores_are_the_mean_of_the_k_smallest_standardised_squared_distances():
    rng = np.random.default_rng(0)
    bank_features = rng.normal(2.0, 3.0, (50, 6))
    queries = rng.normal(2.0, 3.0, (7, 6))
    bank = feat.bank_from_features(bank_features)
    np.testing.assert_allclose(bank.features.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(feat.knn_scores(queries.astype(np.float32), bank, 3), numpy_knn(queries, bank_features, 3),
                               rtol=1e-4)
    # a bank row scores (about) zero with k = 1; k is capped at the bank's size
    assert float(feat.knn_scores(bank_features[:1].astype(np.float32), bank, 1)[0]) < 1e-3
    np.testing.assert_allclose(feat.knn_scores(queries.astype(np.float32), bank, 500),
                               numpy_knn(queries, bank_features, 50), rtol=1e-4)


def test_a_whitened_bank_measures_the_ridge_mahalanobis_distance_to_each_neighbour():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(5, 5))
    bank_features = rng.normal(size=(80, 5)) @ mixing + 4.0  # correlated features
    queries = rng.normal(size=(6, 5)) @ mixing + 4.0
    mean, std = bank_features.mean(0), bank_features.std(0)
    z, b = (queries - mean) / std, (bank_features - mean) / std
    precision = np.linalg.inv(b.T @ b / len(b) + image_bank.WHITEN_RIDGE * np.eye(5))
    diff = z[:, None, :] - b[None]
    d2 = np.einsum("qmd,de,qme->qm", diff, precision, diff)
    bank = image_bank.bank_from_features(bank_features, whiten=True)
    np.testing.assert_allclose(image_bank.knn_scores(queries.astype(np.float32), bank, 4),
                               np.sort(d2, axis=1)[:, :4].mean(1), rtol=1e-3)
    # whitening changes the ranking here; without it the distance is the plain one
    plain = image_bank.bank_from_features(bank_features)
    np.testing.assert_array_equal(plain.whiten, np.eye(5, dtype=np.float32))
    assert np.abs(np.asarray(image_bank.knn_scores(queries.astype(np.float32), plain, 4))
                  - np.sort(d2, axis=1)[:, :4].mean(1)).max() > 0.1
    # stored and restored; a bank stored before `whiten` existed is not whitened
    restored = image_bank.from_arrays(image_bank.to_arrays(bank))
    np.testing.assert_array_equal(restored.whiten, bank.whiten)
    old = {k: v for k, v in image_bank.to_arrays(plain).items() if not k.endswith("whiten")}
    np.testing.assert_array_equal(image_bank.from_arrays(old).whiten, np.eye(5, dtype=np.float32))


def test_grid_features_are_the_middle_block_averaged_over_equal_cells(network):
    module, params, _ = network
    x = images(2, 3)

    def capture(mdl, method_name):
        return mdl.name == image_bank.LAYER and method_name == "__call__"

    _, state = module.apply(params, np.asarray(x, np.float32) / 127.5 - 1.0, np.ones(2, np.float32), None,
                            capture_intermediates=capture, mutable=["intermediates"])
    h = np.asarray(state["intermediates"][image_bank.LAYER]["__call__"][0])  # [2, s, s, C]
    half = h.shape[1] // 2
    grid_fn = jax.jit(image_bank.build_features_fn(module, conditional=False, clean_time=1.0, grid=2))
    f = np.asarray(grid_fn(params, x, np.zeros(2, np.int32)))
    want = np.stack([h[:, rows, cols].mean((1, 2)) for rows in (slice(0, half), slice(half, None))
                     for cols in (slice(0, half), slice(half, None))], axis=1).reshape(2, -1)
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ScoreRuleError, match="score.feature_grid=3 needs the middle block's size"):
        jax.jit(image_bank.build_features_fn(module, conditional=False, clean_time=1.0, grid=3))(
            params, x, np.zeros(2, np.int32))
    # a config that asks for it stops before training, in one line
    bad = CONFIG.replace(score=dataclasses.replace(CONFIG.score, feature_knn=5, feature_grid=3))
    with pytest.raises(ScoreRuleError, match="score.feature_grid=3 needs the middle block's size"):
        config_lib.validate(bad)
    config_lib.validate(bad.replace(score=dataclasses.replace(bad.score, feature_grid=4)))


def test_features_are_the_middle_block_statistics_of_the_clean_image(network):
    module, params, _ = network
    features_fn = jax.jit(image_bank.build_features_fn(module, conditional=False, clean_time=1.0))
    x = images(3, 1)
    f = np.asarray(features_fn(params, x, np.zeros(3, np.int32)))
    assert f.shape == (3, 2 * CONFIG.net.base_channels * CONFIG.net.channel_mult[-1])
    # the decoder's output conv does not reach the features; the middle block does
    out_conv = jax.tree_util.tree_map(lambda a: a + 1.0, params["params"]["out_conv"])
    changed = {"params": {**params["params"], "out_conv": out_conv}}
    np.testing.assert_array_equal(np.asarray(features_fn(changed, x, np.zeros(3, np.int32))), f)
    mid = jax.tree_util.tree_map(lambda a: a + 0.1, params["params"]["mid_res_1"])
    changed = {"params": {**params["params"], "mid_res_1": mid}}
    assert np.abs(np.asarray(features_fn(changed, x, np.zeros(3, np.int32))) - f).max() > 1e-3


def test_each_method_reads_the_clean_image_at_its_own_end_of_time(network):
    from fmjax.methods.radar.method import METHOD as RADAR
    from fmjax.methods.radar.settings import PRESETS as RADAR_PRESETS

    module, params, apply_fn = network
    leaves, treedef = jax.tree.flatten(params)  # moved off the initialisation, whose zero layers ignore t
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(treedef, [a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
    x = images(2, 5)
    at = {t: np.asarray(jax.jit(image_bank.build_features_fn(module, False, t))(params, x, np.zeros(2, np.int32)))
          for t in (0.0, 1.0)}
    assert np.abs(at[0.0] - at[1.0]).max() > 1e-3  # the time input reaches the middle block
    flow = fm_method.METHOD.scorer(CONFIG.replace(score=SETTINGS), apply_fn, SHAPE)
    np.testing.assert_allclose(flow.features(params, x), at[1.0], rtol=1e-5, atol=1e-6)  # a flow ends at t = 1
    radar_settings = dataclasses.replace(RADAR_PRESETS["tiny"], feature_knn=3)
    ddpm = RADAR.scorer(CONFIG.replace(method="radar", score=radar_settings), apply_fn, SHAPE)
    np.testing.assert_allclose(ddpm.features(params, x), at[0.0], rtol=1e-5, atol=1e-6)  # a DDPM at t = 0


def test_scorer_scores_images_by_feature_distance_and_keeps_its_maps(network):
    _, params, apply_fn = network
    config = CONFIG.replace(score=SETTINGS)
    scorer = fm_method.METHOD.scorer(config, apply_fn, SHAPE)
    bank_features = scorer.features(params, images(9, 2))
    fitted = Fitted(arrays=feat.to_arrays(feat.bank_from_features(bank_features)))
    for test in (images(3, 3), images(1, 4)):  # one image: fewer than devices, the grid path
        maps, scores = scorer.score(params, test, fitted=fitted)
        expected = numpy_knn(scorer.features(params, test).astype(np.float64), bank_features.astype(np.float64), 3)
        np.testing.assert_allclose(scores, expected, rtol=1e-4)
    plain = fm_method.METHOD.scorer(config.replace(score=dataclasses.replace(SETTINGS, feature_knn=0)), apply_fn,
                                    SHAPE)
    plain_maps, plain_scores = plain.score(params, test)
    np.testing.assert_allclose(maps, plain_maps, rtol=1e-6)
    assert not np.allclose(scores, plain_scores)
    # the image scores alone: the same scores without the mismatch program (never built)
    alone = fm_method.METHOD.scorer(config, apply_fn, SHAPE)
    many = images(5, 6)
    np.testing.assert_allclose(alone.image_scores(params, many, fitted=fitted),
                               scorer.score(params, many, fitted=fitted)[1], rtol=1e-5)
    assert alone._batches is None and not alone._grids
    np.testing.assert_array_equal(plain.image_scores(params, many), plain.score(params, many)[1])
    with pytest.raises(ScoreRuleError, match="fmjax calibrate"):
        scorer.score(params, test, fitted=Fitted())


def normals(x, prefix):
    n = len(x)
    return Split(images=x, masks=np.zeros((n,) + SHAPE[:2], np.uint8), labels=np.zeros(n, np.int32),
                 names=tuple(f"{prefix}{i}" for i in range(n)), defect_types=("good",) * n,
                 original_sizes=np.full((n, 2), SHAPE[0], np.int32))


def test_fit_banks_a_draw_of_the_trained_images_and_thresholds_the_held_out_ones(network):
    _, params, apply_fn = network
    settings = SETTINGS
    config = CONFIG.replace(score=settings)
    scorer = fm_method.METHOD.scorer(config, apply_fn, SHAPE)
    run = types.SimpleNamespace(scorer=scorer, params=params, config=config,
                                score=lambda x, y, fitted: scorer.score(params, x, y, fitted))
    trained, holdout = normals(images(10, 4), "t"), normals(images(5, 5), "h")
    fitted = fm_method.METHOD.fit(run, trained, holdout)
    picked = np.sort(np.random.default_rng([settings.seed, 13]).permutation(10)[:6])
    bank = feat.from_arrays(fitted.arrays)
    expected = feat.bank_from_features(scorer.features(params, trained.images[picked]))
    np.testing.assert_allclose(bank.features, expected.features, rtol=1e-5, atol=1e-6)
    held_scores = scorer.score(params, holdout.images, fitted=fitted)[1]
    assert fitted.values["num_normal_images"] == 5
    assert fitted.values["image_threshold"] == pytest.approx(
        np.quantile(held_scores, config.calibration.image_threshold_quantile), rel=1e-5)


NET3 = dataclasses.replace(CONFIG.net, channel_mult=(1, 2, 2))  # three resolutions: 16, 8 and 4 pixels
MAP_SETTINGS = Settings(num_paths=2, num_times=2, aggregate="mean", smooth_sigma=1.0, feature_map=0.5, patch_bank=40,
                        chunk_size=4, image_batch=1)


@pytest.fixture(scope="module")
def network3():
    module, params = unet.create(NET3, SHAPE, jax.random.PRNGKey(1))
    _, apply_fn = unet.build_model(NET3, SHAPE)
    return module, params, apply_fn


def test_patch_features_are_the_encoders_second_and_third_resolution_pooled_to_the_coarser_grid(network3):
    module, params, _ = network3
    layers = feat.patch_layers(NET3)
    assert layers == ("down_1_res_0", "down_2_res_0")
    assert feat.patch_layers(CONFIG.net) == ("down_1_res_0",)
    assert feat.patch_layers(dataclasses.replace(CONFIG.net, channel_mult=(1,))) == ("down_0_res_0",)
    patch_fn = jax.jit(feat.build_patch_features_fn(module, False, layers))
    x, ids = images(2, 6), np.zeros(2, np.int32)
    f = np.asarray(patch_fn(params, x, ids))
    assert f.shape == (2, 4, 4, 2 * NET3.base_channels + 2 * NET3.base_channels)
    # nothing after the encoder reaches them, the listed blocks do
    for name, changes in (("mid_res_1", False), ("out_conv", False), ("down_2_res_0", True)):
        moved = jax.tree_util.tree_map(lambda a: a + 0.1, params["params"][name])
        g = np.asarray(patch_fn({"params": {**params["params"], name: moved}}, x, ids))
        assert (np.abs(g - f).max() > 1e-3) == changes, name


def test_nearest_maps_are_the_squared_distance_to_the_nearest_bank_row_resized():
    rng = np.random.default_rng(1)
    rows = rng.normal(1.0, 2.0, (30, 5))
    queries = rng.normal(1.0, 2.0, (2, 3, 3, 5)).astype(np.float32)
    bank = feat.bank_from_features(rows)
    mean, std = rows.mean(0), rows.std(0)
    z, b = (queries - mean) / std, (rows - mean) / std
    nearest = ((z[..., None, :] - b) ** 2).sum(-1).min(-1)
    got = feat.nearest_maps(queries, bank, (6, 6), chunk=4)  # 18 positions in chunks of 4: padding
    np.testing.assert_allclose(got, jax.image.resize(nearest, (2, 6, 6), "bilinear"), rtol=1e-4, atol=1e-4)
    # a bank row is at distance zero from itself
    assert float(feat.nearest_maps(rows[None, None, :1].astype(np.float32), bank, (1, 1)).max()) < 1e-3
    # a whitened bank: the ridge-Mahalanobis distance of the standardised features to the nearest row
    whitened = feat.bank_from_features(rows, whiten=True)
    inverse = np.linalg.inv(b.T @ b / len(b) + image_bank.WHITEN_RIDGE * np.eye(5))
    diff = z[..., None, :] - b
    nearest = np.einsum("...md,de,...me->...m", diff, inverse, diff).min(-1)
    got = feat.nearest_maps(queries, whitened, (3, 3), chunk=4)
    np.testing.assert_allclose(got, nearest, rtol=1e-4, atol=1e-4)


def numpy_k_center(points, first, size):
    picked, nearest = [first], ((points - points[first]) ** 2).sum(-1)
    while len(picked) < size:
        picked.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((points - points[picked[-1]]) ** 2).sum(-1))
    return picked


def test_coreset_picks_the_farthest_row_from_those_picked_so_far():
    points = np.random.default_rng(3).normal(size=(200, 6)).astype(np.float32)
    got = feat.coreset(points, 25, jax.random.PRNGKey(4))
    assert got.dtype == np.int32 and got.shape == (25,)
    assert list(got) == numpy_k_center(points.astype(np.float64), int(got[0]), 25)
    assert list(feat.coreset(points, 25, jax.random.PRNGKey(4))) == list(got)  # seeded
    # projected to fewer dimensions: still distinct rows, and all of them when size = M
    projected = feat.coreset(points, 200, jax.random.PRNGKey(4), dim=2)
    assert sorted(projected) == list(range(200))
    # the picked rows cover the cloud better than a random draw of as many
    def radius(index):
        return ((points[:, None] - points[index][None]) ** 2).sum(-1).min(1).max()
    assert radius(got) < radius(np.random.default_rng(0).permutation(200)[:25])
    with pytest.raises(ScoreRuleError, match="coreset of 201 rows"):
        feat.coreset(points, 201, jax.random.PRNGKey(4))


def test_fit_and_score_mix_the_feature_map_into_the_standardised_mismatch_map(network3):
    _, params, apply_fn = network3
    config = CONFIG.replace(net=NET3, score=MAP_SETTINGS)
    scorer = fm_method.METHOD.scorer(config, apply_fn, SHAPE)
    run = types.SimpleNamespace(scorer=scorer, params=params, config=config,
                                score=lambda x, y, fitted: scorer.score(params, x, y, fitted))
    trained, holdout = normals(images(6, 7), "t"), normals(images(4, 8), "h")
    assert fm_method.METHOD.min_holdout(config) == 2
    fitted = fm_method.METHOD.fit(run, trained, holdout)
    bank = feat.from_arrays(fitted.arrays, feat.PATCH_PREFIX)
    assert bank.features.shape == (40, 4 * NET3.base_channels)  # 40 of the 6 x 16 positions
    # standardised by all the positions' statistics, the rows of their coreset
    every = scorer.patch_features(params, trained.images)
    every = feat.bank_from_features(every.reshape(-1, every.shape[-1]))
    keep = np.sort(feat.coreset(every.features, 40, jax.random.PRNGKey(MAP_SETTINGS.seed)))
    np.testing.assert_allclose(bank.features, every.features[keep], rtol=1e-6)
    np.testing.assert_allclose(bank.mean, every.mean, rtol=1e-6)
    # the mismatch map M as the scorer without the feature map reads it, F against the bank;
    # their scale comes from the first half of the held-out normals, the thresholds from the other
    plain = fm_method.METHOD.scorer(config.replace(score=dataclasses.replace(MAP_SETTINGS, feature_map=0.0)),
                                    apply_fn, SHAPE)
    first = holdout.images[:2]
    np.testing.assert_allclose(feat.scale_from_arrays(fitted.arrays), feat.map_scale(
        plain.score(params, first)[0], scorer.feature_maps(params, first, patches=bank)), rtol=1e-4)
    assert fitted.values["num_normal_images"] == 2 and fitted.values["num_normalization_images"] == 2
    scale = feat.scale_from_arrays(fitted.arrays)
    test = images(3, 9)
    mismatch, feature = plain.score(params, test)[0], scorer.feature_maps(params, test, patches=bank)
    assert feature.min() >= 0 and feature.max() > 0
    maps, _ = scorer.score(params, test, fitted=fitted)
    np.testing.assert_allclose(maps, 0.5 * (mismatch - scale[0]) / scale[1] + 0.5 * (feature - scale[2]) / scale[3],
                               rtol=1e-4, atol=1e-4)
    assert fm_method.METHOD.cost(config, SHAPE)["network_calls_per_image"] == 2 * 2 + 1
    with pytest.raises(ScoreRuleError, match="score.feature_map"):
        scorer.score(params, test, fitted=Fitted())


def test_patch_whiten_whitens_the_feature_maps_bank_before_its_coreset(network3):
    _, params, apply_fn = network3
    settings = dataclasses.replace(MAP_SETTINGS, patch_whiten=True)
    config = CONFIG.replace(net=NET3, score=settings)
    scorer = fm_method.METHOD.scorer(config, apply_fn, SHAPE)
    run = types.SimpleNamespace(scorer=scorer, params=params, config=config,
                                score=lambda x, y, fitted: scorer.score(params, x, y, fitted))
    trained, holdout = normals(images(6, 7), "t"), normals(images(4, 8), "h")
    bank = feat.from_arrays(fm_method.METHOD.fit(run, trained, holdout).arrays, feat.PATCH_PREFIX)
    every = scorer.patch_features(params, trained.images)
    every = feat.bank_from_features(every.reshape(-1, every.shape[-1]), whiten=True)
    keep = np.sort(feat.coreset(every.features, 40, jax.random.PRNGKey(settings.seed)))
    np.testing.assert_allclose(bank.whiten, every.whiten, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bank.features, every.features[keep], rtol=1e-5, atol=1e-5)
    assert np.abs(bank.whiten - np.eye(len(bank.mean))).max() > 0.1
