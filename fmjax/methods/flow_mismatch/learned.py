"""The learned map rule (score.map_rule = learned): a linear read-out of the standardised
per-time mismatch, fitted on held-out normal images against self-supervised defects
made from the same images.

Each pixel p has 2T + 1 standardised values (`normalize.Stats` of held-out normals):

  z_j(p) = (a_j(p) - mean_j) / std_j               the mismatch at time t_j
  l_j(p) = (log a_j(p) - log_mean_j) / log_std_j   its logarithm (large for too little
                                                   mismatch as well: a flat defect)
  f(p)   = (F(p) - c_F) / s_F                       the feature map (score.feature_map > 0,
                                                   else 0)

and the map is  sum_j u_j z_j(p) + sum_j v_j l_j(p) + c f(p).  Which times and which
tail tell a defect from normal texture differs between data (the noisiest times on grass,
the cleanest on brick): the weights (u, v, c) are an L2-regularised logistic regression
of the pixels of the held-out normals (negative) against the same images with one
self-supervised defect each (`fmjax.data.synthetic`; the defect's pixels positive, the
rest negative). Only normal training images are read.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fmjax.errors import ScoreRuleError
from fmjax.methods.flow_mismatch.normalize import LOG_EPS, Stats

__all__ = ["REGULARIZATION", "fit_readout", "learned_map", "readout_size", "pixel_values"]

REGULARIZATION = 0.01  # sklearn's C, chosen by experiments/learned_map.py on validation data
_MAX_ROWS = 100_000  # negative pixels the regression reads at most (a seeded draw)


def readout_size(num_times: int) -> int:
    """2T + 1."""
    return 2 * num_times + 1


def pixel_values(per_time, feature, stats: Stats, scale):
    """per_time float32 [..., T, H, W] (paths aggregated, smoothed), feature [..., H, W] or
    None, scale [4] (`features.map_scale`) -> the standardised values [..., H, W, 2T + 1]."""
    z = (per_time - stats.mean) / stats.std
    logs = (jnp.log(per_time + LOG_EPS) - stats.log_mean) / stats.log_std
    f = jnp.zeros(per_time.shape[:-3] + per_time.shape[-2:], per_time.dtype) if feature is None \
        else (feature - scale[2]) / scale[3]
    return jnp.concatenate([jnp.moveaxis(z, -3, -1), jnp.moveaxis(logs, -3, -1), f[..., None]], -1)


def learned_map(per_time, feature, stats: Stats, scale):
    """The learned map [..., H, W] with the weights stats.readout [2T + 1]."""
    return pixel_values(per_time, feature, stats, scale) @ stats.readout


def fit_readout(normal, defective, masks, seed: int, regularization: float = REGULARIZATION) -> np.ndarray:
    """normal [N, H, W, D], defective [M, H, W, D] (`pixel_values` of held-out normals and of
    the same kind of images with self-supervised defects), masks [M, H, W] (nonzero: defect)
    -> weights float32 [D] of a class-balanced logistic regression (no intercept is kept:
    the map's level does not matter to its ranking, thresholds are fitted on it)."""
    from sklearn.linear_model import LogisticRegression

    normal, defective = np.asarray(normal, np.float64), np.asarray(defective, np.float64)
    inside = np.asarray(masks) > 0
    if not inside.any():
        raise ScoreRuleError("the learned map rule found no defect pixels to fit on")
    negatives = np.concatenate([normal.reshape(-1, normal.shape[-1]), defective[~inside]])
    rng = np.random.default_rng([seed, 23])
    if len(negatives) > _MAX_ROWS:
        negatives = negatives[rng.choice(len(negatives), _MAX_ROWS, replace=False)]
    positives = defective[inside]
    x = np.concatenate([negatives, positives])
    y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    model = LogisticRegression(C=regularization, class_weight="balanced", max_iter=2000).fit(x, y)
    return model.coef_[0].astype(np.float32)
