"""What kind of images a training set holds, measured on the images themselves: the
`auto` preset picks its settings from this (fmjax.app.train.resolve_auto)."""
from __future__ import annotations

import numpy as np

__all__ = ["ALIGNED_THRESHOLD", "MAX_ALIGNED_SIZE", "aligned_size", "alignment", "kind"]

# Measured on training images only (experiments/select_settings.py): Fashion-MNIST classes
# 0.31-0.74, handwritten digits 0.64-0.81, textures (brick, grass, gravel) below 0.01.
ALIGNED_THRESHOLD = 0.1
MAX_ALIGNED_SIZE = 64


def alignment(images: np.ndarray) -> float:
    """Share of the images' variance that is explained by position.

    images: uint8 or float [N, H, W, C]. Returns the variance over pixels of the expected
    image over the variance of all values, on the channel mean: near 1 when every image
    puts the same content at the same place (centred objects, digits), near 0 for
    stationary textures, whose expected image is flat. The mean image of N images keeps
    1/N of their variance about it, so that share (each pixel's variance over the images,
    averaged, over N) is taken off: otherwise any 6 crops of a texture would read 0.17.
    0.0 for fewer than two images or constant data.
    """
    x = np.asarray(images, np.float64).mean(axis=-1)
    n = len(x)
    if n < 2:
        return 0.0
    total = x.var()
    if not total > 0:
        return 0.0
    chance = x.var(axis=0, ddof=1).mean() / n
    return float(max(x.mean(axis=0).var() - chance, 0.0) / total)


def kind(images: np.ndarray) -> str:
    """'aligned' (objects at fixed positions: whole-image model and per-pixel statistics)
    or 'texture' (stationary patterns: patch model and statistics shared over positions)."""
    return "aligned" if alignment(images) > ALIGNED_THRESHOLD else "texture"


def aligned_size(original_sizes: np.ndarray) -> int:
    """Working side for aligned images: the largest source side rounded up to a multiple
    of 16 (the small net's downsampling), at most MAX_ALIGNED_SIZE. 28 x 28 -> 32.

    original_sizes: int [N, 2] (height, width)."""
    side = int(np.max(original_sizes)) if len(original_sizes) else MAX_ALIGNED_SIZE
    return int(min(MAX_ALIGNED_SIZE, max(16, -(-side // 16) * 16)))
