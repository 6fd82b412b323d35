"""How far an image AUROC can be trusted: DeLong's confidence interval of one AUROC, and
DeLong's paired test of two AUROCs read on the same images.

A test split of 40 images (20 normal, 20 anomalous) pins an AUROC near 0.7 down to about
+-0.17, and two methods a few thousandths apart on thousands of images may not differ. Both
functions use the variance of the AUROC as a two-sample U-statistic (DeLong, DeLong and
Clarke-Pearson, Biometrics 1988) and a normal approximation, as R's pROC does; ties count
one half. The interval is clipped to [0, 1] and is a single point where the AUROC is 0
or 1 (the estimated variance is then 0): read such a result as "the split cannot say".
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

from fmjax.eval.metrics import _check_scores_labels

__all__ = ["auroc_difference", "auroc_interval", "placement_values"]


def placement_values(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of the AUROC of scores float [N] (higher = more
    anomalous) against labels {0, 1} [N]: (v_anomalous float64 [m], v_normal float64 [n]).

    v_anomalous[i] is the share of normal images that anomalous image i outscores (ties
    one half), v_normal[j] the share of anomalous images that outscore normal image j;
    each averages to the AUROC. Computed from mid-ranks in O(N log N)."""
    scores, labels = _check_scores_labels(scores, labels)
    anomalous, normal = scores[labels], scores[~labels]
    m, n = anomalous.size, normal.size
    if m == 0 or n == 0:
        return np.zeros(0), np.zeros(0)
    rank_all = stats.rankdata(np.concatenate([anomalous, normal]))
    v_anomalous = (rank_all[:m] - stats.rankdata(anomalous)) / n
    v_normal = 1.0 - (rank_all[m:] - stats.rankdata(normal)) / m
    return v_anomalous, v_normal


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(special.ndtri(0.5 + level / 2.0))


def _aurocs_and_covariance(score_sets, labels):
    """AUROCs float64 [R] of R score vectors on the same images and DeLong's covariance of
    them, float64 [R, R]; None with fewer than two images of either kind."""
    values = [placement_values(scores, labels) for scores in score_sets]
    v_anomalous, v_normal = np.stack([v for v, _ in values]), np.stack([v for _, v in values])  # [R, m], [R, n]
    if v_anomalous.shape[1] < 2 or v_normal.shape[1] < 2:
        return None
    cov = (np.atleast_2d(np.cov(v_anomalous, ddof=1)) / v_anomalous.shape[1]
           + np.atleast_2d(np.cov(v_normal, ddof=1)) / v_normal.shape[1])
    return v_anomalous.mean(axis=1), cov


def auroc_interval(scores, labels, level: float = 0.95) -> tuple[float, float]:
    """DeLong's `level` confidence interval (low, high) of the AUROC of scores float [N]
    against labels {0, 1} [N]; (nan, nan) with fewer than two images of either kind."""
    z = _z(level)
    found = _aurocs_and_covariance([scores], labels)
    if found is None:
        return math.nan, math.nan
    (auroc,), cov = found
    half = z * math.sqrt(cov[0, 0])
    return max(0.0, float(auroc) - half), min(1.0, float(auroc) + half)


def auroc_difference(scores_a, scores_b, labels, level: float = 0.95) -> dict:
    """DeLong's paired comparison of two AUROCs on the same images: scores_a, scores_b
    float [N] (two methods' image scores, same order), labels {0, 1} [N].

    Returns {"auroc_a", "auroc_b", "difference" (a - b), "low", "high" (its `level`
    interval, clipped to [-1, 1]), "p_value" (two-sided, H0: equal AUROCs)}. Where the variance of
    the difference is 0 (e.g. identical rankings) p_value is 1 if the difference is 0, else 0."""
    z = _z(level)
    found = _aurocs_and_covariance([scores_a, scores_b], labels)
    if found is None:
        return dict.fromkeys(("auroc_a", "auroc_b", "difference", "low", "high", "p_value"), math.nan)
    aurocs, cov = found
    auroc_a, auroc_b = float(aurocs[0]), float(aurocs[1])
    difference = auroc_a - auroc_b
    variance = max(float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]), 0.0)
    if variance == 0.0:
        p_value = 1.0 if difference == 0.0 else 0.0
    else:
        p_value = float(2.0 * special.ndtr(-abs(difference) / math.sqrt(variance)))
    half = z * math.sqrt(variance)
    return {"auroc_a": auroc_a, "auroc_b": auroc_b, "difference": difference, "low": max(-1.0, difference - half),
            "high": min(1.0, difference + half), "p_value": p_value}
