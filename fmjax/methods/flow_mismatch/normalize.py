"""Maps from the per-time mismatch, with statistics fitted on held-out normal images.

The raw mismatch differs in scale by orders of magnitude across times, and (for aligned
images) across pixel positions; on busy textures a region the model predicts too well
(a blur, a stain smoother than its surroundings) has less mismatch than normal texture.
Statistics of the path-aggregated, smoothed per-time maps a_j(p) of held-out normal
images fix both:

  weighted   (1/T) sum_j w(t_j) z_j(p),  z_j = (a_j - mean_j) / std_j  (normalize = none:
             z_j = a_j, the paper's rule)
  two_sided  sqrt((1/T) sum_j l_j(p)^2),  l_j = (log a_j - log_mean_j) / log_std_j: large
             where the mismatch is unusually high OR unusually low for a normal image
  combined   the weighted and the two-sided maps, each standardised by its normal pixels,
             summed: high where either is

normalize = global fits one mean and std per time over all pixels (textures, where any
position may show anything); pixel fits them per time and pixel (aligned objects).
All map functions are jittable and take the statistics as arrays (`Stats`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from fmjax.errors import ScoreRuleError

__all__ = ["LOG_EPS", "Stats", "fit_stats", "from_arrays", "mismatch_map", "neutral_stats", "to_arrays"]

LOG_EPS = 1e-6  # the log of a mismatch of zero stays finite
_STD_FLOOR = 1e-6


class Stats(NamedTuple):
    """Statistics of held-out normal per-time maps: mean, std, log_mean, log_std float32
    [T, h, w] (h = w = 1 for global statistics, else the image's H, W); center, scale
    float32 [2]: the normal pixels' mean and std of the weighted and two-sided maps;
    readout float32 [2T + 1]: the learned rule's weights (learned.py; zeros until fitted)."""

    mean: object
    std: object
    log_mean: object
    log_std: object
    center: object
    scale: object
    readout: object


def neutral_stats(num_times: int) -> Stats:
    """Statistics that change nothing: zero means, unit stds, [T, 1, 1]."""
    zeros, ones = np.zeros((num_times, 1, 1), np.float32), np.ones((num_times, 1, 1), np.float32)
    return Stats(zeros, ones, zeros, ones, np.zeros(2, np.float32), np.ones(2, np.float32),
                 np.zeros(2 * num_times + 1, np.float32))


def _weighted(per_time, weights, stats: Stats, normalized: bool):
    z = (per_time - stats.mean) / stats.std if normalized else per_time
    return jnp.einsum("...thw,t->...hw", z, weights) / weights.shape[0]


def _two_sided(per_time, stats: Stats):
    z = (jnp.log(per_time + LOG_EPS) - stats.log_mean) / stats.log_std
    return jnp.sqrt(jnp.mean(jnp.square(z), axis=-3))


def mismatch_map(per_time, weights, normalize: str, map_rule: str, stats: Stats):
    """per_time float32 [..., T, H, W] (paths aggregated, smoothed), weights w(t_j) [T] ->
    map [..., H, W] by `map_rule` (weighted | two_sided | combined), higher = more
    anomalous. `stats` are ignored by the weighted rule when normalize is none."""
    normalized = normalize != "none"
    if map_rule == "weighted":
        return _weighted(per_time, weights, stats, normalized)
    if not normalized:
        raise ScoreRuleError(f"score.map_rule={map_rule} needs statistics of normal images: set score.normalize "
                             f"to global or pixel")
    two = _two_sided(per_time, stats)
    if map_rule == "two_sided":
        return two
    if map_rule == "combined":
        one = _weighted(per_time, weights, stats, normalized)
        return (one - stats.center[0]) / stats.scale[0] + (two - stats.center[1]) / stats.scale[1]
    if map_rule == "learned":
        raise ScoreRuleError("score.map_rule=learned reads the feature map as well: it is scored by the Scorer "
                             "(learned.learned_map)")
    raise ScoreRuleError(f"unknown score.map_rule {map_rule!r} (known: weighted, two_sided, combined, learned)")


def fit_stats(per_time, weights, normalize: str) -> Stats:
    """Statistics of the per-time maps float [N, T, H, W] of held-out NORMAL images (never
    test images): per time over all images and pixels (global) or per time and pixel
    (pixel); the combined rule's centres and scales from the same images' maps."""
    if normalize not in ("global", "pixel"):
        raise ScoreRuleError(f"statistics are fitted for score.normalize global or pixel, not {normalize!r}")
    per_time = np.asarray(per_time, np.float64)
    if per_time.ndim != 4 or len(per_time) < 2:
        raise ScoreRuleError(f"fitting normalisation statistics needs per-time maps of at least 2 normal images, "
                             f"got shape {list(per_time.shape)}")
    axes = (0, 2, 3) if normalize == "global" else (0,)
    logs = np.log(per_time + LOG_EPS)

    def moments(values):
        mean, std = values.mean(axes, keepdims=True)[0], values.std(axes, keepdims=True)[0]
        return mean.astype(np.float32), np.maximum(std, _STD_FLOOR).astype(np.float32)

    mean, std = moments(per_time)
    log_mean, log_std = moments(logs)
    partial = Stats(mean, std, log_mean, log_std, np.zeros(2, np.float32), np.ones(2, np.float32),
                    np.zeros(2 * len(mean) + 1, np.float32))
    w = jnp.asarray(weights, jnp.float32)
    one = np.asarray(_weighted(jnp.asarray(per_time, jnp.float32), w, partial, True), np.float64)
    two = np.asarray(_two_sided(jnp.asarray(per_time, jnp.float32), partial), np.float64)
    center = np.array([one.mean(), two.mean()], np.float32)
    scale = np.maximum(np.array([one.std(), two.std()]), _STD_FLOOR).astype(np.float32)
    return partial._replace(center=center, scale=scale)


_PREFIX = "normalize_"


def to_arrays(stats: Stats) -> dict:
    """Stats as named arrays for the run's fitted state (calibration.npz)."""
    return {_PREFIX + name: np.asarray(value, np.float32) for name, value in stats._asdict().items()}


def from_arrays(arrays: dict, num_times: int, image_hw) -> Stats:
    """The Stats stored by `to_arrays`, checked against the scorer's T and image size; a
    one-line ScoreRuleError when they are missing or fitted for other settings."""
    arrays = {_PREFIX + "readout": np.zeros(2 * num_times + 1, np.float32), **arrays}  # runs fitted before it
    names = [_PREFIX + f for f in Stats._fields]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ScoreRuleError("these scoring settings need normalisation statistics of held-out normal images, "
                             "and the run has none: fit them with `fmjax calibrate --run RUN` or train again")
    stats = Stats(*(np.asarray(arrays[n], np.float32) for n in names))
    shape = stats.mean.shape
    if len(shape) != 3 or shape[0] != num_times or shape[1:] not in ((1, 1), tuple(image_hw)):
        raise ScoreRuleError(f"the run's normalisation statistics have shape {list(shape)}, not [T={num_times}, "
                             f"1 or H, 1 or W]: they were fitted for other scoring settings; fit them again")
    if stats.readout.shape != (2 * num_times + 1,):
        raise ScoreRuleError(f"the run's learned map weights have shape {list(stats.readout.shape)}, not "
                             f"[2T+1={2 * num_times + 1}]: they were fitted for other scoring settings; fit them again")
    return stats
