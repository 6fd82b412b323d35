"""Scoring-rule studies: the vectorised grid equals the scorer's functions row by row;
the batched pixel metrics equal fmjax.eval.metrics; the sorting network equals jnp.sort."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.errors import ScoreRuleError
from fmjax.eval import metrics
from fmjax.methods.flow_mismatch import order, study
from fmjax.methods.flow_mismatch.scorer import interior_times
from fmjax.methods.flow_mismatch.settings import Settings


def stored_case(n=6, t_max=3, k_max=4, side=12, seed=0, levels=None):
    """A stored mismatch [n, t_max, k_max, side, side] larger inside small square defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side, side), np.uint8)
    labels = np.zeros(n, np.int32)
    for i in range(0, n, 2):
        y, x = rng.integers(0, side - 4, 2)
        masks[i, y:y + 3, x:x + 4], labels[i] = 1, 1
    delta = rng.gamma(1.0, 1.0, (n, t_max, k_max, side, side)) * (1 + 1.5 * masks[:, None, None])
    if levels:  # quantised: many ties between pixels, paths and rules
        delta = np.round(delta * levels) / levels
    return delta.astype(np.float32), interior_times(t_max), labels, masks


def assert_rows_equal(fast, slow):
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-12, nan_ok=True), (key, a, b)
            else:
                assert a[key] == b[key]


@pytest.mark.parametrize("levels", [None, 2])
def test_every_row_equals_the_serial_computation(levels):
    delta, times, labels, masks = stored_case(levels=levels)
    rules = study.rule_grid(Settings(), num_paths=[1, 2, 4], num_times=[1, 3],
                            aggregate=["min", "rank:2", "median", "trimmed:0.25", "mean"],
                            time_weight=["t2", "none"], smooth_sigma=[0.0, 1.0],
                            image_score=["max_plus_top1", "topk_mean:0.1"])
    assert len(rules) == 3 * 2 * 2 * 2 * 2 * 5 - 2 * 2 * 2 * 2  # rank:2 needs K >= 2
    # two map groups of few rules each and odd image chunks: padding and grouping covered
    fast = study.evaluate_rules(delta, times, rules, labels, masks, image_chunk=4,
                                max_bytes=40 * delta[:, 0, 0].nbytes)
    assert_rows_equal(fast, study.serial_rows(delta, times, rules, labels, masks))
    row = fast[0]
    assert (row["num_paths"], row["num_times"], row["aggregate"], row["image_score"]) == (1, 1, "min", "max_plus_top1")
    assert set(metrics.IMAGE_KEYS + metrics.PIXEL_KEYS) <= row.keys()
    assert not set(study.STORED) & row.keys()


def test_rows_without_masks_and_from_float16():
    delta, times, labels, _ = stored_case(n=5)
    delta = delta.astype(np.float16)  # as `path_aggregation.py --float16` stores it
    rules = study.rule_grid(Settings(smooth_sigma=1.0), num_paths=[2, 4], aggregate=["rank:2", "mean"],
                            num_times=[3])
    fast = study.evaluate_rules(delta, times, rules, labels)
    assert_rows_equal(fast, study.serial_rows(delta, times, rules, labels))
    assert all(math.isnan(r["pixel_auroc"]) and not math.isnan(r["image_auroc"]) for r in fast)


def test_grid_checks():
    with pytest.raises(ScoreRuleError, match="not a rule field"):
        study.rule_grid(Settings(), chunk_size=[8])
    with pytest.raises(ScoreRuleError, match="aggregate"):
        study.rule_grid(Settings(), aggregate=["nearest"])
    with pytest.raises(ScoreRuleError, match="sub-grid"):
        study.time_index(2, 7)
    t_max, index = study.time_grid([1, 3, 7])
    assert t_max == 7 and list(index[3]) == [1, 3, 5]
    np.testing.assert_array_equal(interior_times(7)[index[3]], interior_times(3))
    delta, times, labels, masks = stored_case(n=2)
    with pytest.raises(ScoreRuleError, match="exceeds"):
        study.evaluate_rules(delta, times, [Settings(num_paths=8, num_times=3)], labels)
    # the map rule: image score and neutral fields do not change a map
    assert study.map_rule(Settings(image_score="max", chunk_size=3)) == Settings()


def test_masked_pixels_equal_pixel_metrics():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 20, 20), np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 12:14, 12:18] = 1  # two regions in one image
    masks[2, 5:15, 7] = 1
    masked = metrics.MaskedPixels(masks)
    for maps in (rng.random(masks.shape).astype(np.float32) + masks,  # float32, separable
                 rng.random(masks.shape) - 0.3 * masks,  # float64, inverted
                 np.round(rng.random(masks.shape) * 3) + masks,  # many ties, across classes too
                 np.zeros(masks.shape, np.float32)):  # one value
        got, want = masked(maps), metrics.pixel_metrics(maps, masks)
        for key in metrics.PIXEL_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-13), key
        assert got["pixel_auroc"] == want["pixel_auroc"] and got["pixel_f1_max"] == want["pixel_f1_max"]
    nothing = metrics.MaskedPixels(np.zeros((2, 4, 4)))
    assert all(math.isnan(v) for v in nothing(np.ones((2, 4, 4))).values())
    with pytest.raises(ValueError, match="shape"):
        masked(np.zeros((4, 20, 19)))
    with pytest.raises(ValueError, match="NaN"):
        masked(np.full(masks.shape, np.nan))


def test_sorting_network_equals_sort():
    rng = np.random.default_rng(0)
    sort = jax.jit(order.sort_axis, static_argnums=1)
    for n in (1, 3, 16):
        x = (rng.integers(0, 4, (300, n)) * rng.random((300, 1))).astype(np.float32)  # ties
        np.testing.assert_array_equal(np.asarray(sort(x, 1)), np.sort(x, 1))
    for n in (5, 12):  # 0-1 principle: every 0/1 input sorted means every input is
        bits = np.array(list(itertools.product([0.0, 1.0], repeat=n)), np.float32)
        np.testing.assert_array_equal(np.asarray(sort(bits, -1)), np.sort(bits, -1))
    x = rng.random((2, 40, 3), np.float32)  # beyond MAX_NETWORK: jnp.sort
    np.testing.assert_array_equal(np.asarray(order.sort_axis(jnp.asarray(x), 1)), np.sort(x, 1))
