"""The grid of square patches RADAR scores an image with: origins, extraction and the
stitching of per-patch maps back into an image map."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.methods.radar.settings import check_patch

__all__ = ["coverage", "extract_patches", "patch_origins", "patch_origins_1d", "stitch"]


def patch_origins_1d(size: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets 0, stride, 2*stride, ...; a last start of size - patch is added when
    the strides stop short of the border, so every pixel is covered."""
    check_patch(patch, stride, (size, size))
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return np.asarray(starts, np.int64)


def patch_origins(height: int, width: int, patch: int, stride: int) -> np.ndarray:
    """Top-left corners int64 [P, 2] (row-major over the grid of row and column starts)."""
    check_patch(patch, stride, (height, width))
    rows, cols = patch_origins_1d(height, patch, stride), patch_origins_1d(width, patch, stride)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def _patch_index(origins, patch: int):
    offsets = np.arange(patch)
    iy = origins[:, 0, None, None] + offsets[None, :, None]  # [P, p, 1]
    ix = origins[:, 1, None, None] + offsets[None, None, :]  # [P, 1, p]
    return iy, ix


def extract_patches(images, patch: int, stride: int):
    """images [B,H,W,C] (numpy or jax) -> (patches [B,P,patch,patch,C], origins int64 [P,2])."""
    origins = patch_origins(images.shape[1], images.shape[2], patch, stride)
    iy, ix = _patch_index(origins, patch)
    return images[:, iy, ix], origins


def coverage(origins, patch: int, height: int, width: int) -> np.ndarray:
    """How many patches cover each pixel, float32 [H, W]."""
    counts = np.zeros((height, width), np.float32)
    for y, x in np.asarray(origins):
        counts[y:y + patch, x:x + patch] += 1.0
    return counts


def stitch(patch_maps, origins, height: int, width: int):
    """Per-patch maps [B,P,p,p] -> image maps [B,H,W], overlaps averaged (weights =
    coverage counts).  origins: static int [P, 2] from extract_patches."""
    origins = np.asarray(origins)
    patch = patch_maps.shape[-1]
    counts = coverage(origins, patch, height, width)
    if np.any(counts == 0):
        raise ConfigError("the patches do not cover every pixel of the image")
    iy, ix = _patch_index(origins, patch)
    iy, ix = np.broadcast_to(iy, (len(origins), patch, patch)), np.broadcast_to(ix, (len(origins), patch, patch))
    total = jnp.zeros((patch_maps.shape[0], height, width), jnp.float32)
    total = total.at[:, iy, ix].add(jnp.asarray(patch_maps, jnp.float32))
    return total / jnp.asarray(counts)
