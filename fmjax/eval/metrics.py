"""Exact anomaly-detection metrics: image and pixel AUROC / AP / F1-max, and AUPRO.

All functions are pure, take numpy-compatible inputs and return plain Python floats.
Scores are "higher = more anomalous"; labels and masks use 1 = anomalous, 0 = normal.
A metric that is undefined for the given labels (e.g. AUROC with one class only) is
returned as nan rather than raising. Non-finite scores raise ValueError.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------- validation


def _check_scores(scores, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contain NaN or inf")
    return scores


def _check_binary(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != bool and not np.all((values == 0) | (values == 1)):
        raise ValueError(f"{name} must contain only 0 and 1")
    return values.astype(bool)


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    labels = _check_binary(labels, "labels")
    if labels.shape != scores.shape:
        raise ValueError(f"labels shape {labels.shape} does not match scores shape {scores.shape}")
    return scores, labels


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _map_mask_pairs(maps, masks) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (map float64 [H, W], mask bool [H, W]) pairs from [N, H, W] arrays or lists."""
    if isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W] or a list of 2-D arrays, got shape {maps.shape}")
    if isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or a list of 2-D arrays, got shape {masks.shape}")
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("maps is empty")
    pairs = []
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        amap = np.asarray(amap)
        if amap.dtype.kind != "f":
            amap = amap.astype(np.float64)
        mask = _check_binary(mask, "masks")
        if amap.ndim != 2 or amap.shape != mask.shape:
            raise ValueError(f"map {i} has shape {amap.shape} but its mask has shape {mask.shape} (need equal 2-D)")
        if not np.all(np.isfinite(amap)):
            raise ValueError("maps contain NaN or inf")
        pairs.append((amap, mask))
    return pairs


# ---------------------------------------------------------------- ranking


def _order_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 [P] keys that order like float `scores` [P] and are equal exactly where the
    scores are: float32 bits mapped to an unsigned order (no sort needed), else the
    scores' ranks among their distinct values."""
    if scores.dtype == np.float32:
        bits = (scores + np.float32(0.0)).view(np.int32)  # + 0 turns -0.0 into +0.0
        # negative: flip every bit; positive: flip the sign bit
        flip = bits >> 31
        flip |= np.int32(-2**31)
        bits ^= flip
        del flip
        return bits.view(np.uint32).astype(np.uint64)
    return np.unique(scores, return_inverse=True)[1].ravel().astype(np.uint64)


class _Ranking:
    """Samples ranked by score, highest first, ties grouped: the basis of every curve.

    For each distinct score k (descending), `positives[k]` and `negatives[k]` count the
    samples scoring at or above it, and `group_ends[k]` is the last position of its run
    in `region` (the region id of every ranked sample, 0 = negative). One sort of packed
    64-bit keys (score order in the high half, region id in the low half) ranks them:
    numpy sorts unsigned integers several times faster than it argsorts floats.
    """

    def __init__(self, scores: np.ndarray, region: np.ndarray):
        if scores.size >= 2**32:
            raise ValueError(f"too many samples to rank ({scores.size})")
        # in-place steps and early `del`s: the pooled pixels of a test set run to 10^8
        packed = _order_keys(scores)
        packed <<= np.uint64(32)
        packed |= region.astype(np.uint64)
        packed.sort()
        packed = packed[::-1]
        score_changes = packed[1:] ^ packed[:-1]
        score_changes >>= np.uint64(32)
        self.group_ends = np.append(np.flatnonzero(score_changes), packed.size - 1)
        del score_changes
        self.region = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        del packed
        self.positives = np.cumsum(self.region > 0, dtype=np.int64)[self.group_ends]
        self.negatives = self.group_ends + 1 - self.positives


def _pixel_ranking(pairs) -> tuple[_Ranking, int]:
    """The pooled pixels of (map, mask) pairs ranked, each with its ground-truth region
    (the masks' 8-connected components, numbered across images; 0 = normal), and the
    number of regions."""
    scores, region_ids = [], []
    n_regions = 0
    for amap, mask in pairs:
        ids, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids.append(np.where(ids > 0, ids + n_regions, 0).ravel())
        n_regions += count
        scores.append(amap.ravel())
    return _Ranking(np.concatenate(scores), np.concatenate(region_ids)), n_regions


# ---------------------------------------------------------------- threshold-free metrics


def _auroc_ap(ranking: _Ranking) -> tuple[float, float]:
    """ROC AUC (trapezoids between the distinct-score points, from (0, 0)) and average
    precision (sum over distinct scores of recall gain times precision), as sklearn's
    roc_auc_score and average_precision_score."""
    tp, fp = ranking.positives, ranking.negatives
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    tp0, fp0 = np.concatenate([[0], tp]), np.concatenate([[0], fp])
    # twice the area in counts: an exact integer (below 2^63 for under 2^32 samples)
    twice_area = int(np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])))
    auroc = twice_area / (2.0 * n_pos * n_neg)
    ap = float(np.sum(np.diff(tp0) / n_pos * (tp / (tp + fp))))
    return float(auroc), ap


def _f1_max(ranking: _Ranking) -> tuple[int, float]:
    """(index of the distinct score with the best F1 (the lowest such score), that F1);
    (-1, nan) without positives."""
    tp, fp = ranking.positives, ranking.negatives
    n_pos = int(tp[-1])
    if n_pos == 0:
        return -1, math.nan
    f1 = 2.0 * tp / (n_pos + tp + fp)  # 2PR / (P + R) with P = tp / (tp + fp), R = tp / n_pos
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    return best, float(f1[best])


def f1_max(scores, labels) -> tuple[float, float]:
    """Oracle F1: the best F1 over all thresholds, and the threshold that attains it.

    scores: float [N], higher = more anomalous. labels: {0, 1} [N].
    Returns (f1 in [0, 1], threshold) with prediction `score >= threshold`; among
    thresholds with the best F1, the lowest.
    This is an ORACLE number: the threshold is chosen with the test labels, so it is an
    upper bound on what a deployed detector would reach (see `threshold_from_normals`).
    Returns (nan, nan) when there is no positive label (F1 undefined).
    """
    scores, labels = _check_scores_labels(scores, labels)
    ranking = _Ranking(scores, labels)
    best, f1 = _f1_max(ranking)
    if best < 0:
        return math.nan, math.nan
    return f1, float(np.sort(scores)[::-1][ranking.group_ends[best]])


def image_metrics(scores, labels) -> dict:
    """Image-level AUROC, average precision and oracle F1-max.

    scores: float [N], higher = more anomalous. labels: {0, 1} [N], 1 = anomalous.
    Returns {"image_auroc", "image_ap", "image_f1_max"}, each in [0, 1].
    If labels hold one class only, image_auroc and image_ap are nan (undefined);
    image_f1_max is nan when there is no anomalous image.
    """
    ranking = _Ranking(*_check_scores_labels(scores, labels))
    auroc, ap = _auroc_ap(ranking)
    return {"image_auroc": auroc, "image_ap": ap, "image_f1_max": _f1_max(ranking)[1]}


# ---------------------------------------------------------------- AUPRO


def _aupro(ranking: _Ranking, n_regions: int, fpr_limit: float) -> float:
    if n_regions == 0:
        return math.nan
    n_normal = int(ranking.negatives[-1])
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels (mask == 0) but every pixel is anomalous")

    # Each anomalous pixel carries weight 1 / (|its region| * n_regions), so the summed
    # weight of the pixels at or above a threshold is the mean per-region overlap (PRO).
    region_size = np.bincount(ranking.region, minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (region_size[1:] * float(n_regions))
    pro = weight[ranking.region]
    np.cumsum(pro, out=pro)
    pro = pro[ranking.group_ends]
    fpr = np.concatenate([[0.0], ranking.negatives / n_normal])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
    return _area_to_limit(fpr, pro, fpr_limit)


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under the curve (fpr, pro) from (0, 0) up to fpr_limit (pro
    interpolated there), divided by fpr_limit, clipped to [0, 1]."""
    # fpr is non-decreasing and reaches 1, so a first point beyond the limit exists
    # whenever the curve has not already hit the limit exactly.
    keep = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_kept, pro_kept = fpr[:keep], pro[:keep]
    if fpr_kept[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[keep - 1], fpr[keep], pro[keep - 1], pro[keep]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr_kept = np.append(fpr_kept, fpr_limit)
        pro_kept = np.append(pro_kept, pro_at_limit)
    area = float(np.sum(np.diff(fpr_kept) * (pro_kept[1:] + pro_kept[:-1]) / 2.0))
    return min(max(area / fpr_limit, 0.0), 1.0)


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to `fpr_limit`, exact.

    maps: float [N, H, W] (higher = more anomalous) or a list of 2-D float arrays.
    masks: {0, 1} [N, H, W] or a list of 2-D arrays, each the same shape as its map.
    Ground-truth regions are the 8-connected components of each mask. For a threshold
    th, FPR(th) is the fraction of ALL normal pixels (mask == 0, all images) with
    map >= th, and PRO(th) is the mean over ALL regions (all images pooled, each
    region weighted equally) of the fraction of its pixels with map >= th. The curve
    has one point per distinct map value (tied pixels enter together), starts at
    (0, 0), is integrated with the trapezoid rule up to FPR = fpr_limit (PRO linearly
    interpolated there) and divided by fpr_limit.
    Returns a float in [0, 1]; nan when no mask has an anomalous pixel.
    Raises ValueError when there is no normal pixel or fpr_limit is not in (0, 1].
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    return _aupro(*_pixel_ranking(_map_mask_pairs(maps, masks)), fpr_limit)


# ---------------------------------------------------------------- pixel and combined


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict:
    """Pixel-level AUROC, average precision, oracle F1-max and AUPRO.

    maps: float [N, H, W] or a list of 2-D float arrays (sizes may differ per image).
    masks: {0, 1} [N, H, W] or a list of 2-D arrays, paired with maps (same shape per pair).
    Pixels of all images are pooled. Returns {"pixel_auroc", "pixel_ap",
    "pixel_f1_max", "aupro"}, each in [0, 1]; undefined values are nan (see
    `image_metrics` and `aupro`).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    ranking, n_regions = _pixel_ranking(_map_mask_pairs(maps, masks))
    auroc, ap = _auroc_ap(ranking)
    return {
        "pixel_auroc": auroc,
        "pixel_ap": ap,
        "pixel_f1_max": _f1_max(ranking)[1],
        "aupro": _aupro(ranking, n_regions, fpr_limit),
    }


def compute_all(image_scores, labels, maps=None, masks=None, fpr_limit: float = 0.3) -> dict:
    """Image metrics merged with pixel metrics (see `image_metrics`, `pixel_metrics`).

    image_scores: float [N]; labels: {0, 1} [N]; maps, masks as in `pixel_metrics`.
    The pixel keys are nan when maps/masks are None or no mask has an anomalous pixel.
    """
    result = image_metrics(image_scores, labels)
    pixel = dict.fromkeys(PIXEL_KEYS, math.nan)
    if maps is not None and masks is not None:
        pairs = _map_mask_pairs(maps, masks)
        if any(mask.any() for _, mask in pairs):
            pixel = pixel_metrics([a for a, _ in pairs], [m for _, m in pairs], fpr_limit)
    result.update(pixel)
    return result


# ---------------------------------------------------------------- many maps, one set of masks


class MaskedPixels:
    """`pixel_metrics` of many maps against the same masks (studies that score one test
    set under many rules): the masks' 8-connected regions are labelled once, and a map
    costs a sort of its normal pixels (the anomalous ones are few) and two binary searches
    per distinct anomalous value among them, instead of a sort of all pixels with labels.

    masks: {0, 1} [N, H, W]. Calling it with maps float [N, H, W] returns the dict of
    `pixel_metrics(maps, masks, fpr_limit)`: AUROC and F1-max equal to the last bit (the
    same integer counts), AP and AUPRO up to the rounding of their sums (about 1e-15).
    """

    def __init__(self, masks, fpr_limit: float = 0.3):
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[0] == 0:
            raise ValueError(f"masks must be [N, H, W] with N >= 1, got shape {masks.shape}")
        masks = _check_binary(masks, "masks")
        self.shape = masks.shape
        region, offset = np.zeros(masks.shape, np.int64), 0
        for i, mask in enumerate(masks):
            ids, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region[i] = np.where(ids > 0, ids + offset, 0)
            offset += count
        region = region.ravel()
        self.n_regions = offset
        self._positive = np.flatnonzero(region > 0)
        self._negative = np.flatnonzero(region == 0)
        size = np.bincount(region, minlength=offset + 1)
        self._weight = 1.0 / (size[region[self._positive]] * float(max(offset, 1)))

    def __call__(self, maps) -> dict:
        maps = np.asarray(maps)
        if maps.shape != self.shape:
            raise ValueError(f"maps have shape {maps.shape} but the masks {self.shape}")
        flat = maps.reshape(-1) if maps.dtype.kind == "f" else maps.reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(flat)):
            raise ValueError("maps contain NaN or inf")
        n_pos, n_neg = self._positive.size, self._negative.size
        result = dict.fromkeys(PIXEL_KEYS, math.nan)
        if n_pos == 0:
            return result
        pos, neg = flat[self._positive], np.sort(flat[self._negative])
        order = np.argsort(pos, kind="stable")
        values, start, counts = np.unique(pos[order], return_index=True, return_counts=True)
        m = values.size
        # normal pixels below / at or below each distinct anomalous value: m searches in the
        # sorted normals, where searching each normal among the anomalous values costs more
        below = np.searchsorted(neg, values, side="left").astype(np.int64)
        at_or_below = np.searchsorted(neg, values, side="right").astype(np.int64)
        # descending distinct anomalous values: tp = pixels >= value, fp = normals >= value
        tp = (n_pos - start)[::-1]
        fp = (n_neg - below)[::-1]
        f1 = 2.0 * tp / (n_pos + tp + fp)
        result["pixel_f1_max"] = float(f1.max())
        if n_neg == 0:
            if self.n_regions:
                raise ValueError("AUPRO needs normal pixels (mask == 0) but every pixel is anomalous")
            return result
        # twice the ROC area in counts: each anomalous pixel scores 2 per normal pixel below it, 1 per tie
        twice_area = int(counts.astype(np.int64) @ (below + at_or_below))
        result["pixel_auroc"] = float(twice_area / (2.0 * n_pos * n_neg))
        result["pixel_ap"] = float(np.sum(counts[::-1] / n_pos * (tp / (tp + fp))))
        # PRO curve from the top: normals strictly between distinct anomalous values move along
        # a flat step, normals tied with one move with its rise
        tied_count = at_or_below - below
        between = np.concatenate([below, [n_neg]]) - np.concatenate([[0], at_or_below])  # [m + 1]
        pro_at = np.cumsum(np.add.reduceat(self._weight[order], start)[::-1])[::-1]  # PRO at each value
        steps = np.empty(2 * m + 1, np.int64)
        steps[0], steps[1::2], steps[2::2] = between[m], tied_count[::-1], between[:m][::-1]
        levels = np.zeros(2 * m + 1)
        levels[1::2] = levels[2::2] = pro_at[::-1]
        fpr = np.concatenate([[0.0], np.cumsum(steps) / n_neg])
        pro = np.concatenate([[0.0], np.minimum(levels, 1.0)])
        result["aupro"] = _area_to_limit(fpr, pro, self.fpr_limit)
        return result


# ---------------------------------------------------------------- fixed thresholds


def thresholded_metrics(scores, labels, threshold: float) -> dict:
    """Precision, recall, F1 and accuracy of the prediction `score >= threshold`.

    scores: float [N]; labels: {0, 1} [N]. Returns {"precision", "recall", "f1",
    "accuracy"}, each in [0, 1]; a ratio with a zero denominator is 0.0.
    """
    scores, labels = _check_scores_labels(scores, labels)
    pred = scores >= float(threshold)
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))

    def ratio(num: int, den: int) -> float:
        return num / den if den > 0 else 0.0

    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": float(np.mean(pred == labels)),
    }


def threshold_from_normals(normal_scores, quantile: float = 0.99) -> float:
    """A decision threshold fitted on normal (e.g. held-out good) images only.

    normal_scores: float [M]; quantile in [0, 1]. Returns the `quantile` quantile of
    the scores (linear interpolation), so about (1 - quantile) of normals score above it.
    """
    scores = _check_scores(normal_scores, "normal_scores")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(scores, quantile))
