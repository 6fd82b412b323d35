"""Map post-processing shared by the map-based methods: Gaussian smoothing and the rules
that turn a map into an image score (jitted; their parsers are in `rules`)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.methods.rules import parse_image_score

__all__ = ["gaussian_kernel", "gaussian_smooth", "image_score"]


def _top_mean(flat, fraction):
    k = max(1, math.ceil(fraction * flat.shape[-1] - 1e-9))
    return jnp.mean(jax.lax.top_k(flat, k)[0], axis=-1)


def image_score(maps, spec: str):
    """Image scores [B] from maps [B, H, W].

    max_plus_top1: max(H) + mean of the top 1% of pixels (at least one pixel);
    max: max(H); topk_mean:f: mean of the top ceil(f * H * W) pixels; mean: mean of all.
    """
    kind, frac = parse_image_score(spec)
    flat = maps.reshape(maps.shape[0], -1)
    if kind == "max":
        return jnp.max(flat, axis=-1)
    if kind == "max_plus_top1":
        return jnp.max(flat, axis=-1) + _top_mean(flat, frac)
    if frac >= 1.0:
        return jnp.mean(flat, axis=-1)
    return _top_mean(flat, frac)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D normalised Gaussian taps, radius int(truncate * sigma + 0.5) (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_smooth(maps, sigma: float):
    """Separable Gaussian blur of maps [B, H, W]; mirror borders as scipy's 'reflect'."""
    if sigma <= 0:
        return maps
    taps = jnp.asarray(gaussian_kernel(sigma))
    radius = (taps.shape[0] - 1) // 2

    def blur_axis(m, axis):
        n = m.shape[axis]
        # scipy's 'reflect' (d c b a | a b c d | d c b a), periodic for any radius
        idx = np.arange(-radius, n + radius) % (2 * n)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        m = jnp.take(m, jnp.asarray(idx), axis=axis)
        return sum(taps[i] * jax.lax.slice_in_dim(m, i, i + n, axis=axis) for i in range(taps.shape[0]))

    return blur_axis(blur_axis(maps, 1), 2)
