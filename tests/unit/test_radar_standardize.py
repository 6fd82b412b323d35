"""fmjax's additions to RADAR for aligned images: the per-pixel standardisation of the
noise map (score.normalize = pixel; the statistics by hand, the scorer against a plain
loop, what `fit` fits them on, the one-line errors of a run without them), the map
feature (score.map_feature) and the one-sided forest (score.one_sided)."""
import dataclasses
import types

import numpy as np
import pytest
import scipy.ndimage
from test_radar import PARAMS, toy_apply

from fmjax.config import build
from fmjax.data import split_halves
from fmjax.data.base import Split
from fmjax.errors import RunError
from fmjax.methods.base import Fitted
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar import method as radar_method
from fmjax.methods.radar import scorer as radar_scorer_lib
from fmjax.methods.radar import standardize
from fmjax.methods.radar.settings import RadarSettings
from fmjax.methods.radar.settings import validate_settings


def test_statistics_by_hand():
    maps = np.array([[[1.0, 5.0]], [[3.0, 5.0]], [[5.0, 5.0]]])  # [3, 1, 2]: the second pixel never varies
    stats = standardize.fit(maps)
    np.testing.assert_allclose(stats[standardize.MEAN], [[3.0, 5.0]])
    sd = np.sqrt(8 / 3)
    np.testing.assert_allclose(stats[standardize.STD], [[sd, 1e-3 * sd / 2]], rtol=1e-6)
    neutral = standardize.from_fitted(None, "none", 1, 2)
    assert np.all(neutral[standardize.MEAN] == 0) and np.all(neutral[standardize.STD] == 1)
    assert standardize.from_fitted(Fitted(arrays=stats), "pixel", 1, 2)[standardize.MEAN].dtype == np.float32
    with pytest.raises(ValueError):
        standardize.fit(maps[:1])


@pytest.mark.parametrize("arrays", [{}, {standardize.MEAN: np.zeros((2, 2)), standardize.STD: np.ones((2, 2))},
                                    {standardize.MEAN: np.zeros((1, 2)), standardize.STD: np.zeros((1, 2))},
                                    {standardize.MEAN: np.full((1, 2), np.nan), standardize.STD: np.ones((1, 2))}])
def test_missing_or_damaged_statistics_are_one_line_errors(arrays):
    with pytest.raises(RunError) as err:
        standardize.from_fitted(Fitted(arrays=arrays), "pixel", 1, 2)
    assert "\n" not in str(err.value) and "calibrate" in str(err.value)


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="score.normalize"):
        validate_settings(RadarSettings(normalize="global"))


def test_standardised_scorer_equals_a_plain_loop():
    rc = RadarSettings(patch_size=4, patch_stride=2, t_score=300, image_batch=2, sobel_smooth_sigma=1.0,
                       normalize="pixel")
    scorer = radar_scorer_lib.RadarScorer(toy_apply, rc, (8, 8, 1))
    rng = np.random.default_rng(3)
    normals, images = (rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8) for n in (6, 3))
    noise_maps = scorer.noise_maps(PARAMS, normals)
    plain = dataclasses.replace(rc, normalize="none")
    plain_maps = radar_scorer_lib.RadarScorer(toy_apply, plain, (8, 8, 1))
    # the smoothed noise map is what the Sobel filter of the paper's rule reads
    sobel_of = lambda m: np.hypot(scipy.ndimage.sobel(m, 0, mode="reflect"), scipy.ndimage.sobel(m, 1, mode="reflect"))
    np.testing.assert_allclose(plain_maps.maps_and_features(PARAMS, normals)[0],
                               np.stack([sobel_of(m) for m in noise_maps.astype(np.float64)]), atol=1e-4, rtol=1e-4)
    stats = standardize.fit(noise_maps)
    fitted = Fitted(arrays=stats)
    maps, feats = scorer.maps_and_features(PARAMS, images, None, fitted)
    z = (scorer.noise_maps(PARAMS, images) - stats[standardize.MEAN]) / stats[standardize.STD]
    want = np.stack([sobel_of(m) for m in z.astype(np.float64)])
    np.testing.assert_allclose(maps, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(feats[:, 0], np.sqrt((want ** 2).sum((1, 2))), rtol=1e-4)
    assert np.abs(maps - plain_maps.maps_and_features(PARAMS, images)[0]).max() > 1e-2
    with pytest.raises(RunError, match="calibrate"):
        scorer.maps_and_features(PARAMS, images)


@pytest.mark.parametrize("normalize", ["none", "pixel"])
def test_map_feature_is_the_l2_norm_of_the_map_the_sobel_filter_reads(normalize):
    rc = RadarSettings(patch_size=4, patch_stride=2, t_score=300, image_batch=2, sobel_smooth_sigma=1.0,
                       normalize=normalize, map_feature=False)
    two = radar_scorer_lib.RadarScorer(toy_apply, rc, (8, 8, 1))
    three = radar_scorer_lib.RadarScorer(toy_apply, dataclasses.replace(rc, map_feature=True), (8, 8, 1))
    rng = np.random.default_rng(5)
    normal_images, images = (rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8) for n in (6, 3))
    stats = standardize.fit(two.noise_maps(PARAMS, normal_images)) if normalize == "pixel" else {}
    fitted = Fitted(arrays=stats)
    maps2, feats2 = two.maps_and_features(PARAMS, images, None, fitted)
    maps3, feats3 = three.maps_and_features(PARAMS, images, None, fitted)
    assert feats2.shape == (3, 2) and feats3.shape == (3, 3)
    np.testing.assert_array_equal(maps3, maps2)
    np.testing.assert_allclose(feats3[:, :2], feats2, rtol=1e-6)
    m = three.noise_maps(PARAMS, images).astype(np.float64)
    if normalize == "pixel":
        m = (m - stats[standardize.MEAN]) / stats[standardize.STD]
    np.testing.assert_allclose(feats3[:, 2], np.sqrt((m ** 2).sum((1, 2))), rtol=1e-4)


def normals(images, prefix):
    n = len(images)
    return Split(images=images, masks=np.zeros((n, 8, 8), np.uint8), labels=np.zeros(n, np.int32),
                 names=tuple(f"{prefix}{i}" for i in range(n)), defect_types=("good",) * n,
                 original_sizes=np.full((n, 2), 8, np.int32))


def test_fit_reads_statistics_and_forest_from_different_halves(monkeypatch):
    rc = RadarSettings(t_score=250, sobel_smooth_sigma=1.0, patch_size=4, patch_stride=2, n_estimators=10,
                       image_batch=2, normalize="pixel")
    scorer = radar_scorer_lib.RadarScorer(toy_apply, rc, (8, 8, 1))
    config = build("tiny", "radar", [])
    run = types.SimpleNamespace(scorer=scorer, params=PARAMS, config=dataclasses.replace(config, score=rc))
    rng = np.random.default_rng(4)
    trained = normals(rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8), "t")
    holdout = normals(rng.integers(0, 256, (7, 8, 8, 1), dtype=np.uint8), "h")
    seen = []
    real_fit = forest_lib.fit
    monkeypatch.setattr(forest_lib, "fit", lambda feats, settings: seen.append(np.array(feats)) or
                        real_fit(feats, settings))
    fitted = radar_method.METHOD.fit(run, trained, holdout)
    for_stats, for_forest = split_halves(holdout)
    stats = standardize.fit(scorer.noise_maps(PARAMS, for_stats.images))
    for name in (standardize.MEAN, standardize.STD):
        np.testing.assert_array_equal(fitted.arrays[name], stats[name])
    maps, feats = scorer.maps_and_features(PARAMS, for_forest.images, None, Fitted(arrays=stats))
    np.testing.assert_array_equal(seen[0], feats)
    assert fitted.values["num_forest_images"] == len(for_forest) == 4
    assert fitted.values["num_normalization_images"] == len(for_stats) == 3
    assert fitted.values["pixel_threshold"] == pytest.approx(
        np.quantile(maps, config.calibration.pixel_threshold_quantile))
    assert radar_method.METHOD.min_holdout(run.config) == 4
    with pytest.raises(RunError, match="at least 4 held-out") as err:
        radar_method.METHOD.fit(run, trained, normals(holdout.images[:3], "h"))
    assert "\n" not in str(err.value)


def test_one_sided_forest_ignores_errors_below_the_normals_median():
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(0)
    normal = rng.normal(10.0, 1.0, (300, 2))
    low, high = np.full((1, 2), 6.0), np.full((1, 2), 14.0)  # as far below the normals as above
    two = forest_lib.fit(normal, RadarSettings(n_estimators=100, one_sided=False))
    one = forest_lib.fit(normal, RadarSettings(n_estimators=100, one_sided=True))
    assert forest_lib.score(two, low)[0] > 0 and forest_lib.score(two, high)[0] > 0  # both flagged
    assert forest_lib.score(one, low)[0] < 0 < forest_lib.score(one, high)[0]  # only the excess
    # scikit-learn's forest on the normals raised to their median, scoring the features as they are
    median = np.median(normal, axis=0)
    model = IsolationForest(n_estimators=100, contamination=0.05, random_state=0).fit(np.maximum(normal, median))
    test = rng.normal(10.0, 3.0, (50, 2))
    want = (-model.decision_function(test)).astype(np.float32)
    np.testing.assert_array_equal(forest_lib.score(one, test), want)
    # below the median, a feature scores as the median itself: the trees split above it
    np.testing.assert_array_equal(forest_lib.score(one, np.maximum(test, median)), want)
    # stored and read back: the same forest
    values, arrays = forest_lib.to_fitted(one)
    np.testing.assert_array_equal(forest_lib.score(forest_lib.from_fitted(Fitted(values, arrays)), test), want)
