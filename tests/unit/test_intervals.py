"""DeLong's interval of one AUROC and paired test of two, against the pair-by-pair
definition (tests/references.py), scikit-learn's AUROC, and their coverage on draws with a
known AUROC."""
import math

import numpy as np
import pytest
from scipy import special
from sklearn.metrics import roc_auc_score

from fmjax.eval import intervals
from tests.references import delong_by_definition


def _draw(rng, n_normal, n_anomalous, shift, ties=False):
    """Binormal scores: normal N(0, 1), anomalous N(shift, 1) (true AUROC Phi(shift / sqrt 2))."""
    scores = np.r_[rng.normal(0, 1, n_normal), rng.normal(shift, 1, n_anomalous)]
    if ties:
        scores = np.round(scores, 0)
    return scores, np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]


@pytest.mark.parametrize("ties", [False, True])
def test_the_interval_is_deLongs_from_every_pair(ties):
    rng = np.random.default_rng(0)
    scores, labels = _draw(rng, 23, 17, 0.8, ties)
    order = rng.permutation(len(scores))  # the interval does not depend on the images' order
    scores, labels = scores[order], labels[order]
    auroc, cov = delong_by_definition(scores, labels)
    v_anomalous, v_normal = intervals.placement_values(scores, labels)
    assert v_anomalous.mean() == pytest.approx(auroc[0], abs=1e-12) == pytest.approx(roc_auc_score(labels, scores))
    assert v_normal.mean() == pytest.approx(auroc[0], abs=1e-12)
    low, high = intervals.auroc_interval(scores, labels, level=0.9)
    half = special.ndtri(0.95) * math.sqrt(cov[0, 0])
    assert (low, high) == pytest.approx((auroc[0] - half, auroc[0] + half), abs=1e-12)


def test_the_paired_test_is_deLongs_from_every_pair():
    rng = np.random.default_rng(1)
    scores, labels = _draw(rng, 30, 20, 1.0, ties=True)
    other = scores + rng.normal(0, 0.7, scores.size)  # correlated with the first, as two methods on one split are
    auroc, cov = delong_by_definition(np.stack([scores, other]), labels)
    out = intervals.auroc_difference(scores, other, labels)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert (out["auroc_a"], out["auroc_b"]) == pytest.approx(tuple(auroc), abs=1e-12)
    assert out["difference"] == pytest.approx(auroc[0] - auroc[1], abs=1e-12)
    assert out["p_value"] == pytest.approx(2 * special.ndtr(-abs(auroc[0] - auroc[1]) / math.sqrt(variance)), rel=1e-9)
    half = special.ndtri(0.975) * math.sqrt(variance)
    assert (out["low"], out["high"]) == pytest.approx((out["difference"] - half, out["difference"] + half), abs=1e-12)
    # the same scores, or any increasing function of them, rank alike: no difference at all
    same = intervals.auroc_difference(scores, np.exp(scores), labels)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0 and same["low"] == same["high"] == 0.0


def test_the_95_percent_interval_covers_the_true_auroc_about_95_times_in_100():
    rng = np.random.default_rng(2)
    shift = 1.0
    truth = special.ndtr(shift / math.sqrt(2))  # 0.760
    covered = []
    for _ in range(400):
        low, high = intervals.auroc_interval(*_draw(rng, 40, 40, shift))
        covered.append(low <= truth <= high)
    # 400 draws: a coverage of 0.95 reads 0.928-0.972 with probability 0.95
    assert 0.925 <= np.mean(covered) <= 0.975


def test_equal_aurocs_are_rejected_about_5_times_in_100_and_a_real_difference_mostly():
    rng = np.random.default_rng(3)
    null, real = [], []
    for _ in range(300):
        base, labels = _draw(rng, 40, 40, 1.0)
        # two noisy readings of one score (equal AUROCs), and a reading of a better score
        a, b = base + rng.normal(0, 0.5, base.size), base + rng.normal(0, 0.5, base.size)
        better = base + labels * 1.0 + rng.normal(0, 0.5, base.size)
        null.append(intervals.auroc_difference(a, b, labels)["p_value"] < 0.05)
        real.append(intervals.auroc_difference(better, a, labels)["p_value"] < 0.05)
    assert 0.02 <= np.mean(null) <= 0.09 and np.mean(real) > 0.8


def test_a_perfect_split_and_a_split_without_both_kinds():
    scores, labels = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])
    assert intervals.auroc_interval(scores, labels) == (1.0, 1.0)  # zero variance: a single point
    assert all(math.isnan(x) for x in intervals.auroc_interval(scores, np.array([0, 0, 0, 1])))
    assert all(math.isnan(x) for x in intervals.auroc_interval(scores, np.zeros(4, int)))
    with pytest.raises(ValueError, match="level"):
        intervals.auroc_interval(scores, labels, level=1.0)
    with pytest.raises(ValueError, match="does not match"):
        intervals.auroc_difference(scores, scores[:3], labels)
