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


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The blur `gaussian_smooth` applies along an axis of length n, as a matrix float32
    [n, n]: row i holds the taps that reach output i, each added at its mirrored source."""
    taps = gaussian_kernel(sigma).astype(np.float64)
    radius = (taps.shape[0] - 1) // 2
    source = _reflect(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], n)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), taps.shape[0]), source.ravel()), np.tile(taps, n))
    return matrix.astype(np.float32)


def _reflect(index, n: int):
    """scipy's 'reflect' border (d c b a | a b c d | d c b a): periodic for any radius."""
    index = index % (2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _smooth_by_slices(maps, sigma: float):
    taps = jnp.asarray(gaussian_kernel(sigma))
    radius = (taps.shape[0] - 1) // 2

    def blur_axis(m, axis):
        n = m.shape[axis]
        m = jnp.take(m, jnp.asarray(_reflect(np.arange(-radius, n + radius), n)), axis=axis)
        return sum(taps[i] * jax.lax.slice_in_dim(m, i, i + n, axis=axis) for i in range(taps.shape[0]))

    return blur_axis(blur_axis(maps, 1), 2)


def _smooth_by_matmul(maps, sigma: float):
    h, w = maps.shape[1:]
    highest = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("ih,bhw->biw", jnp.asarray(blur_matrix(h, sigma)), maps, precision=highest)
    return jnp.einsum("biw,jw->bij", rows, jnp.asarray(blur_matrix(w, sigma)), precision=highest)


def gaussian_smooth(maps, sigma: float):
    """Separable Gaussian blur of maps [B, H, W]; mirror borders as scipy's 'reflect'.

    On CPU the blur is two matrix products with `blur_matrix` (4-10x faster there than
    shifted sums for maps up to 256 pixels wide, docs/performance.md); other platforms keep
    the shifted sums. Both equal scipy's to float32 rounding."""
    if sigma <= 0:
        return maps
    return jax.lax.platform_dependent(maps, cpu=lambda m: _smooth_by_matmul(m, sigma),
                                      default=lambda m: _smooth_by_slices(m, sigma))
