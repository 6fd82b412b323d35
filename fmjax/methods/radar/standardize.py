"""RADAR's per-pixel standardisation of the noise map (score.normalize = pixel).

fmjax's extension for aligned images (objects, digits), not the paper's: every image is
noised with the same fixed noise, so a pixel's noise error on normal images has a
distribution of its own (an object's outline is harder to denoise than the background).
The mean and standard deviation of each pixel's (smoothed) noise map are fitted on held-out
normals the forest never sees, and the Sobel map and features are read from
(map - mean) / std. Kept as two named arrays in the run folder (RUN/calibration.npz).
"""
from __future__ import annotations

import numpy as np

from fmjax.errors import RunError

__all__ = ["MEAN", "STD", "fit", "from_fitted", "neutral"]

MEAN, STD = "noise_map_mean", "noise_map_std"
_STD_FLOOR = 1e-3  # relative to the mean std: a pixel whose error never varies does not divide by ~0


def fit(maps) -> dict:
    """Per-pixel statistics of normal images' noise maps [N, H, W] (N >= 2) ->
    {MEAN: float32 [H, W], STD: float32 [H, W]}, std floored at 1e-3 of its mean."""
    m = np.asarray(maps, np.float64)
    if m.ndim != 3 or len(m) < 2:
        raise ValueError(f"per-pixel statistics need noise maps [N >= 2, H, W], got shape {list(m.shape)}")
    std = m.std(axis=0)
    std = np.maximum(std, _STD_FLOOR * float(std.mean()) + 1e-12)
    return {MEAN: m.mean(axis=0).astype(np.float32), STD: std.astype(np.float32)}


def neutral(height: int, width: int) -> dict:
    """Statistics that leave a map as it is: mean 0, std 1."""
    return {MEAN: np.zeros((height, width), np.float32), STD: np.ones((height, width), np.float32)}


def from_fitted(fitted, normalize: str, height: int, width: int) -> dict:
    """The statistics to score with: the run's for normalize = pixel (a one-line RunError
    when they are missing or of the wrong shape), neutral otherwise."""
    if normalize != "pixel":
        return neutral(height, width)
    arrays = {} if fitted is None else fitted.arrays
    stats = {name: arrays.get(name) for name in (MEAN, STD)}
    for name, a in stats.items():
        if not isinstance(a, np.ndarray) or a.shape != (height, width) or not np.all(np.isfinite(a)):
            raise RunError(f"score.normalize=pixel needs the run's per-pixel statistics ({name} [{height}, {width}]); "
                           f"fit them with fmjax calibrate")
    if np.any(stats[STD] <= 0):
        raise RunError(f"the run's {STD} holds values <= 0: fit the statistics again with fmjax calibrate")
    return {name: a.astype(np.float32) for name, a in stats.items()}
