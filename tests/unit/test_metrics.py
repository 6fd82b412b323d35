import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fmjax.eval import metrics
from references import brute_force_aupro, sklearn_f1_max


# ---------------------------------------------------------------- image level


def test_perfect_separation():
    out = metrics.image_metrics([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert out == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0}


def test_reversed_ranking():
    out = metrics.image_metrics([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
    assert out["image_auroc"] == 0.0
    # positives at ranks 3 and 4: AP = (1/3 + 2/4) / 2
    assert out["image_ap"] == pytest.approx(5 / 12)
    # best is "everything anomalous": P = 1/2, R = 1, F1 = 2/3
    assert out["image_f1_max"] == pytest.approx(2 / 3)


def test_hand_counted_three_quarters():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    out = metrics.image_metrics(scores, labels)
    # (pos, neg) pairs ranked correctly: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4); not (0.35, 0.4)
    assert out["image_auroc"] == pytest.approx(0.75)
    # ranking 0.8+ 0.4- 0.35+ 0.1-: AP = (1/1 + 2/3) / 2
    assert out["image_ap"] == pytest.approx(5 / 6)
    # threshold 0.35: P = 2/3, R = 1, F1 = 0.8 (0.8 gives 2/3, 0.1 gives 2/3)
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    assert out["image_f1_max"] == pytest.approx(0.8)


def test_values_are_plain_floats():
    out = metrics.compute_all(
        [0.1, 0.9], [0, 1], np.array([[[0.0, 1.0]], [[0.2, 0.3]]]), np.array([[[0, 1]], [[0, 0]]])
    )
    assert set(out) == set(metrics.IMAGE_KEYS + metrics.PIXEL_KEYS)
    assert all(type(v) is float for v in out.values())
    f1, th = metrics.f1_max([0.1, 0.9], [0, 1])
    assert type(f1) is float and type(th) is float
    assert type(metrics.threshold_from_normals([1.0, 2.0])) is float


def test_one_class_gives_nan_not_exception():
    out = metrics.image_metrics([0.1, 0.5, 0.9], [0, 0, 0])
    assert all(math.isnan(v) for v in out.values())
    out = metrics.image_metrics([0.1, 0.5, 0.9], [1, 1, 1])
    assert math.isnan(out["image_auroc"]) and math.isnan(out["image_ap"])
    assert out["image_f1_max"] == 1.0
    assert all(math.isnan(v) for v in metrics.f1_max([0.1, 0.2], [0, 0]))


def test_thresholded_metrics():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # predictions [0, 1, 1, 1]: tp 2, fp 1, fn 0, tn 1
    out = metrics.thresholded_metrics(scores, labels, 0.35)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == 1.0
    assert out["f1"] == pytest.approx(0.8)
    assert out["accuracy"] == 0.75
    # nothing predicted anomalous: zero divisions give 0
    out = metrics.thresholded_metrics(scores, labels, 5.0)
    assert out == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5}


def test_threshold_from_normals():
    normals = np.arange(101) / 100.0
    assert metrics.threshold_from_normals(normals) == pytest.approx(0.99)
    assert metrics.threshold_from_normals(normals, quantile=0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.threshold_from_normals(normals, quantile=1.5)


def test_nan_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_metrics([0.1, math.nan], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.threshold_from_normals([0.1, math.nan])
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_metrics(np.full((1, 2, 2), math.nan), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="0 and 1"):
        metrics.image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        metrics.image_metrics([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        metrics.aupro([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 2, 2)), np.eye(2)[None], fpr_limit=0.0)


# ---------------------------------------------------------------- AUPRO


def test_aupro_perfect_map():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[0, 2:5, 2:9] = 1
    masks[1, 10:12, 3] = 1
    maps = rng.random(masks.shape) * 0.5 + masks
    assert metrics.aupro(maps, masks) == 1.0


def test_aupro_constant_map():
    # one threshold takes the curve from (0, 0) straight to (1, 1): PRO = FPR,
    # area up to 0.3 is 0.3 * 0.3 / 2, normalised: 0.15
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 1:3, 1:5] = 1
    masks[1, 6, 6] = 1
    assert metrics.aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15)
    assert metrics.aupro(np.full(masks.shape, 0.7), masks, fpr_limit=1.0) == pytest.approx(0.5)


def _hand_case():
    # image 1 (2x5): region A = 2 px, region B = 1 px; 7 normal px
    mask1 = np.array([[1, 1, 0, 0, 1],
                      [0, 0, 0, 0, 0]])
    map1 = np.array([[0.9, 0.6, 0.8, 0.6, 0.8],
                     [0.1, 0.1, 0.1, 0.1, 0.1]])
    # image 2 (2x4): region C = 5 px; 3 normal px
    mask2 = np.array([[1, 1, 1, 0],
                      [1, 1, 0, 0]])
    map2 = np.array([[0.9, 0.9, 0.7, 0.7],
                     [0.6, 0.1, 0.6, 0.1]])
    return [map1, map2], [mask1, mask2]


def test_aupro_hand_computed_with_interpolation():
    maps, masks = _hand_case()
    # 10 normal pixels, 3 regions (A 2 px, B 1 px, C 5 px). Curve points (FPR, PRO):
    #   th 0.9: normals 0 -> FPR 0.0; A 1/2, B 0, C 2/5  -> PRO (0.5 + 0 + 0.4) / 3 = 0.9 / 3
    #   th 0.8: normals 1 -> FPR 0.1; A 1/2, B 1, C 2/5  -> PRO 1.9 / 3
    #   th 0.7: normals 2 -> FPR 0.2; A 1/2, B 1, C 3/5  -> PRO 2.1 / 3
    #   th 0.6: normals 4 -> FPR 0.4; A 1,   B 1, C 4/5  -> PRO 2.8 / 3  (tie: 2 normals, 2 anomalous)
    #   th 0.1: normals 10 -> FPR 1.0; PRO 1
    # FPR crosses 0.3 between th 0.7 and 0.6: PRO(0.3) = (2.1 + 2.8) / 2 / 3 = 2.45 / 3
    # area = 0.1 * (0.9 + 1.9) / 6 + 0.1 * (1.9 + 2.1) / 6 + 0.1 * (2.1 + 2.45) / 6
    #      = (0.28 + 0.40 + 0.455) / 6 = 1.135 / 6;  divided by 0.3: 1.135 / 1.8
    assert metrics.aupro(maps, masks) == pytest.approx(1.135 / 1.8, abs=1e-12)
    # stopping exactly on a curve point (FPR 0.2): (0.28 + 0.40) / 6 / 0.2
    assert metrics.aupro(maps, masks, fpr_limit=0.2) == pytest.approx(0.68 / 1.2, abs=1e-12)
    # whole curve: adds 0.2 * (2.1 + 2.8) / 6 + 0.6 * (2.8 + 3) / 6 = (0.98 + 3.48) / 6
    whole = (0.28 + 0.40 + 0.98 + 3.48) / 6
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(whole, abs=1e-12)
    assert metrics.pixel_metrics(maps, masks)["aupro"] == pytest.approx(1.135 / 1.8, abs=1e-12)


def test_aupro_weights_regions_not_pixels():
    # small region (1 px) fully found at score 1, large region (9 px) missed at score 0,
    # normals in between at 0.5. Curve: (0, 0) -> (0, 1/2) -> (1, 1/2) -> (1, 1).
    # Region-weighted PRO is 1/2 everywhere below FPR 1; pixel-weighted would be 1/10.
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0] = 1
    mask[4:7, 4:7] = 1
    amap = np.full((8, 8), 0.5)
    amap[0, 0] = 1.0
    amap[4:7, 4:7] = 0.0
    assert metrics.aupro(amap[None], mask[None]) == pytest.approx(0.5)


def test_aupro_regions_are_eight_connected():
    # (0,0)-(1,1) touch diagonally: one region, half found; plus the single region (3,3), found.
    # 8-connected: PRO = (1/2 + 1) / 2 = 0.75; 4-connected would give (1 + 0 + 1) / 3.
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = 1
    amap = np.full((4, 4), 0.5)
    amap[0, 0] = amap[3, 3] = 1.0
    amap[1, 1] = 0.0
    assert metrics.aupro(amap[None], mask[None]) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(12))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(4, 12)), int(rng.integers(4, 12))) for _ in range(3)]
    masks = [(rng.random(s) < 0.25).astype(np.uint8) for s in shapes]
    if seed % 2:  # few levels: many ties between and across normal and anomalous pixels
        maps = [(rng.integers(0, 6, s) + 2 * m) / 5.0 for s, m in zip(shapes, masks)]
        shared = set(np.concatenate([a[m == 1] for a, m in zip(maps, masks)]).tolist())
        assert shared & set(np.concatenate([a[m == 0] for a, m in zip(maps, masks)]).tolist())
    else:
        maps = [rng.random(s) + 0.5 * m for s, m in zip(shapes, masks)]
    for fpr_limit in (0.3, 0.05, 0.5, 1.0):
        expected = brute_force_aupro(maps, masks, fpr_limit)
        assert metrics.aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_undefined_cases():
    assert math.isnan(metrics.aupro(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))))
    with pytest.raises(ValueError, match="normal pixels"):
        metrics.aupro(np.zeros((1, 3, 3)), np.ones((1, 3, 3)))


def test_aupro_of_random_map_is_half_the_limit():
    rng = np.random.default_rng(0)
    maps = rng.random((24, 256, 256)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[::2, 50:90, 60:120] = 1
    masks[1::3, 200:210, 10:20] = 1
    value = metrics.aupro(maps, masks)
    assert 0.1 < value < 0.2  # random map: PRO ~ FPR, about fpr_limit / 2


# ---------------------------------------------------------------- pixel level and combined


def test_list_of_sizes_equals_concatenation():
    rng = np.random.default_rng(3)
    heights = (5, 9, 7)
    maps = [rng.integers(0, 8, (h, 6)) / 7.0 for h in heights]
    masks = []
    for h in heights:
        mask = (rng.random((h, 6)) < 0.3).astype(np.uint8)
        mask[[0, -1]] = 0  # stacking must not join regions of neighbouring images
        masks.append(mask)
    from_list = metrics.pixel_metrics(maps, masks)
    stacked = metrics.pixel_metrics([np.vstack(maps)], [np.vstack(masks)])
    assert from_list == pytest.approx(stacked, abs=1e-12)
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([m.ravel() for m in masks])
    image_like = metrics.image_metrics(flat_scores, flat_labels)
    assert from_list["pixel_auroc"] == pytest.approx(image_like["image_auroc"])
    assert from_list["pixel_ap"] == pytest.approx(image_like["image_ap"])
    assert from_list["pixel_f1_max"] == pytest.approx(image_like["image_f1_max"])


def test_list_equals_array_for_equal_sizes():
    rng = np.random.default_rng(4)
    maps = rng.random((4, 10, 10))
    masks = (rng.random((4, 10, 10)) < 0.2).astype(np.uint8)
    assert metrics.pixel_metrics(list(maps), list(masks)) == metrics.pixel_metrics(maps, masks)


def test_compute_all():
    maps, masks = _hand_case()
    out = metrics.compute_all([0.2, 0.9], [1, 1], maps, masks)
    assert math.isnan(out["image_auroc"])
    assert out["aupro"] == pytest.approx(1.135 / 1.8)
    assert 0.5 < out["pixel_auroc"] <= 1.0
    no_defects = metrics.compute_all([0.2, 0.9], [0, 1], np.ones((2, 4, 4)), np.zeros((2, 4, 4)))
    assert no_defects["image_auroc"] == 1.0
    assert all(math.isnan(no_defects[k]) for k in metrics.PIXEL_KEYS)
    no_maps = metrics.compute_all([0.2, 0.9], [0, 1])
    assert all(math.isnan(no_maps[k]) for k in metrics.PIXEL_KEYS)


# ---------------------------------------------------------------- against sklearn


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_curve_metrics_match_sklearn(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[:2] = [0, 1]
    if seed % 2:  # few levels: ties within and across classes, negative values and -0.0
        scores = (rng.integers(-4, 5, n) / 4.0 + 0.5 * labels).astype(dtype)
        scores[np.flatnonzero(scores == 0)[::2]] = -0.0  # equal to the other zeros
    else:
        scores = (rng.standard_normal(n) + labels).astype(dtype)
    image = metrics.image_metrics(scores, labels)
    maps, masks = scores.reshape(1, 1, n), labels.reshape(1, 1, n)
    pixel = metrics.pixel_metrics(maps, masks)
    expected = (roc_auc_score(labels, scores), average_precision_score(labels, scores), sklearn_f1_max(scores, labels))
    for got in ((image["image_auroc"], image["image_ap"], image["image_f1_max"]),
                (pixel["pixel_auroc"], pixel["pixel_ap"], pixel["pixel_f1_max"])):
        assert got == pytest.approx(expected, abs=1e-12)
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(expected[2], abs=1e-12)
    # the threshold attains it, and no lower threshold does
    assert metrics.thresholded_metrics(scores, labels, threshold)["f1"] == pytest.approx(f1, abs=1e-12)
    lower = scores[scores < threshold]
    if lower.size:
        assert metrics.thresholded_metrics(scores, labels, lower.max())["f1"] < f1 - 1e-12


def test_float32_maps_rank_like_float64():
    rng = np.random.default_rng(7)
    maps = (rng.integers(-50, 50, (3, 40, 30)) * 0.37).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[:, 5:15, 4:20] = 1
    maps += masks * np.float32(3.0)
    assert metrics.pixel_metrics(maps, masks) == pytest.approx(
        metrics.pixel_metrics(maps.astype(np.float64), masks), abs=1e-12)
