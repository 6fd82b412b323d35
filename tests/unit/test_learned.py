"""The learned map rule (fmjax/methods/flow_mismatch/learned.py): its per-pixel values
against their definitions in numpy, and a read-out fitted on defects it can find."""
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmjax.errors import ScoreRuleError
from fmjax.methods.flow_mismatch import learned
from fmjax.methods.flow_mismatch import normalize as norm

T, H, W = 3, 6, 6
WEIGHTS = np.ones(T, np.float32)


def maps(n, seed):
    rng = np.random.default_rng(seed)
    return rng.gamma(4.0, 0.25, (n, T, H, W)).astype(np.float32), rng.normal(2.0, 0.5, (n, H, W)).astype(np.float32)


def test_the_pixel_values_are_the_standardised_mismatch_its_log_and_the_feature_map():
    per_time, feature = maps(5, 0)
    stats = norm.fit_stats(maps(20, 1)[0], WEIGHTS, "global")
    scale = np.array([0.0, 1.0, 1.5, 0.5], np.float32)
    values = np.asarray(learned.pixel_values(jnp.asarray(per_time), jnp.asarray(feature), stats, scale))
    assert values.shape == (5, H, W, learned.readout_size(T))
    z = (per_time - stats.mean) / stats.std
    logs = (np.log(per_time + norm.LOG_EPS) - stats.log_mean) / stats.log_std
    np.testing.assert_allclose(values[..., :T], np.moveaxis(z, 1, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[..., T:2 * T], np.moveaxis(logs, 1, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[..., -1], (feature - 1.5) / 0.5, rtol=1e-5)
    # without a feature map its column is zero
    assert not np.any(np.asarray(learned.pixel_values(jnp.asarray(per_time), None, stats, scale))[..., -1])

    readout = np.arange(1, 2 * T + 2, dtype=np.float32)
    mapped = learned.learned_map(jnp.asarray(per_time), jnp.asarray(feature), stats._replace(readout=readout), scale)
    np.testing.assert_allclose(np.asarray(mapped), values @ readout, rtol=1e-5)


def test_the_fitted_readout_finds_the_values_that_mark_a_defect():
    rng = np.random.default_rng(2)
    d = learned.readout_size(T)
    normal = rng.normal(size=(8, H, W, d))
    defective = rng.normal(size=(8, H, W, d))
    masks = np.zeros((8, H, W), np.uint8)
    masks[:, 1:4, 2:5] = 1
    defective[masks > 0, T + 1] += 3.0  # too little mismatch at the second time: a flat defect
    readout = learned.fit_readout(normal, defective, masks, seed=0)
    assert readout.shape == (d,) and readout.dtype == np.float32
    assert np.argmax(np.abs(readout)) == T + 1 and readout[T + 1] > 0
    held_out = rng.normal(size=(8, H, W, d))
    held_out[masks > 0, T + 1] += 3.0
    assert roc_auc_score(masks.ravel(), (held_out @ readout).ravel()) > 0.95
    with pytest.raises(ScoreRuleError, match="no defect pixels"):
        learned.fit_readout(normal, defective, np.zeros_like(masks), seed=0)


def test_statistics_stored_before_the_learned_rule_load_with_an_empty_readout():
    stats = norm.fit_stats(maps(10, 3)[0], WEIGHTS, "global")
    arrays = norm.to_arrays(stats)
    del arrays["normalize_readout"]
    loaded = norm.from_arrays(arrays, T, (H, W))
    np.testing.assert_array_equal(loaded.readout, np.zeros(2 * T + 1, np.float32))
    arrays["normalize_readout"] = np.zeros(5, np.float32)
    with pytest.raises(ScoreRuleError, match="learned map weights have shape"):
        norm.from_arrays(arrays, T, (H, W))
