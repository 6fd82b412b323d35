"""The network's own features in Flow Mismatching: the image score of score.feature_knn > 0
(`fmjax.methods.image_bank`, read at t = 1, the clean image) and the feature map.

Maps from the same features (score.feature_map = w > 0): the encoder's outputs at its
second and third resolution (`patch_layers`), pooled to the coarser grid and averaged
over 3x3 neighbourhoods, give each position of the clean image a feature vector; its
squared distance to the nearest row of a bank of such vectors from the training normals
(standardised, or with score.patch_whiten whitened: `image_bank.standardize`), resized to
the image and smoothed, is the feature map F. When the training normals give
more than score.patch_bank rows, the bank keeps a greedy k-center coreset of them
(`coreset`, as PatchCore does): every position of the training images stays close to
some bank row, where a random draw leaves gaps that make normal texture look new. The
map is then

  (1 - w) (M - c_M) / s_M + w (F - c_F) / s_F

with M the mismatch map and c, s the mean and std of each map's pixels on held-out
normals (`map_scale`): busy normal texture the flow predicts poorly is still near some
training patch, a flat defect it predicts well is not.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ScoreRuleError
from fmjax.flow import to_model_range
from fmjax.methods.image_bank import (STD_FLOOR, Bank, bank_from_features, empty_bank, from_arrays, knn_scores,
                                      standardize, to_arrays)

__all__ = ["Bank", "Banks", "PATCH_PREFIX", "bank_from_features", "build_patch_features_fn", "combine_maps",
           "coreset", "empty_bank", "from_arrays", "knn_scores", "map_scale", "nearest_maps", "neutral_banks",
           "patch_layers", "scale_from_arrays", "scale_to_arrays", "to_arrays"]

PATCH_PREFIX = "patches_"
_SCALE = "feature_map_scale"


class Banks(NamedTuple):
    """What the feature scores need, fitted on normal images: `images` (the image bank of
    score.feature_knn), `patches` (the patch bank of score.feature_map) and `scale`
    float32 [4] (c_M, s_M, c_F, s_F of the maps, `map_scale`)."""

    images: Bank
    patches: Bank
    scale: object


def neutral_banks() -> Banks:
    """Placeholders for the settings that use no features (the map scale changes nothing)."""
    return Banks(empty_bank(), empty_bank(), np.array([0, 1, 0, 1], np.float32))


def patch_layers(net_config) -> tuple[str, ...]:
    """The encoder blocks the feature map reads: the last residual block of the U-Net's
    second and third resolution (of the first two when it has fewer)."""
    levels = len(net_config.channel_mult)
    last = net_config.num_res_blocks - 1
    return tuple(f"down_{level}_res_{last}" for level in range(min(1, levels - 1), min(3, levels)))


def build_patch_features_fn(module, conditional: bool, layers):
    """patch_fn(params, images_u8 [B,H,W,C], class_ids [B]) -> float32 [B, h, w, D]: the
    outputs of `layers` (`patch_layers`) at t = 1, average-pooled to the grid of the
    coarsest, each averaged over its 3x3 neighbourhood, concatenated over channels."""
    layers = tuple(layers)

    def capture(mdl, method_name):
        return mdl.name in layers and method_name == "__call__"

    def pool(h, factor, same):
        window = (1, factor, factor, 1)
        strides = (1, 1, 1, 1) if same else window
        return jax.lax.reduce_window(h, 0.0, jax.lax.add, window, strides, "SAME" if same else "VALID") / factor ** 2

    def patch_fn(params, images_u8, class_ids):
        x = to_model_range(images_u8)
        t = jnp.ones((x.shape[0],), jnp.float32)
        _, state = module.apply(params, x, t, class_ids if conditional else None, capture_intermediates=capture,
                                mutable=["intermediates"])
        outs = [state["intermediates"][name]["__call__"][0].astype(jnp.float32) for name in layers]
        grid = min(h.shape[1] for h in outs)
        outs = [h if h.shape[1] == grid else pool(h, h.shape[1] // grid, same=False) for h in outs]
        return jnp.concatenate([pool(h, 3, same=True) for h in outs], axis=-1)

    return patch_fn


def nearest_maps(patch_features, bank: Bank, image_hw, chunk: int = 4096):
    """Squared distance of each position's standardised features [B, h, w, D] to its
    nearest bank row [M, D], resized (bilinear) to the image: [B, H, W]. The positions go
    through in chunks of `chunk` rows, so memory stays bounded."""
    b, h, w, d = patch_features.shape
    z = standardize(patch_features, bank).reshape(-1, d)
    rows = z.shape[0]
    pad = -rows % min(chunk, rows)
    z = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, min(chunk, rows), d)
    bank_sq = jnp.sum(jnp.square(bank.features), -1)

    def nearest(q):
        return jnp.min(jnp.sum(jnp.square(q), -1)[:, None] - 2.0 * q @ bank.features.T + bank_sq[None, :], -1)

    d2 = jnp.maximum(jax.lax.map(nearest, z).reshape(-1)[:rows], 0.0).reshape(b, h, w)
    return jax.image.resize(d2, (b,) + tuple(image_hw), "bilinear")


def combine_maps(mismatch, feature, scale, weight: float):
    """(1 - w) (M - c_M) / s_M + w (F - c_F) / s_F of maps [B, H, W] with `scale` [4]."""
    return ((1.0 - weight) * (mismatch - scale[0]) / scale[1]
            + weight * (feature - scale[2]) / scale[3])


def map_scale(mismatch, feature) -> np.ndarray:
    """c_M, s_M, c_F, s_F float32 [4]: mean and std of the pixels of held-out NORMAL images'
    mismatch maps and feature maps [N, H, W]."""
    parts = [np.asarray(m, np.float64) for m in (mismatch, feature)]
    return np.array([v for m in parts for v in (m.mean(), max(m.std(), STD_FLOOR))], np.float32)


def coreset(rows, size: int, key, dim: int | None = None) -> np.ndarray:
    """Greedy k-center coreset of rows float32 [M, D]: int32 [size] indices (size <= M),
    each pick the row farthest from the rows picked before it, the first drawn from `key`.
    Distances are Euclidean; with `dim` < D, after a Gaussian random projection to `dim`
    dimensions drawn from `key` (quicker, and on validation data no better:
    experiments/patch_bank.py)."""
    rows = jnp.asarray(rows, jnp.float32)
    count, width = rows.shape
    if not 1 <= size <= count:
        raise ScoreRuleError(f"a coreset of {size} rows needs 1 <= size <= {count} (the rows it picks from)")
    start_key, projection_key = jax.random.split(key)
    if dim is not None and dim < width:
        rows = rows @ (jax.random.normal(projection_key, (width, dim), jnp.float32) / np.sqrt(dim))
    first = jax.random.randint(start_key, (), 0, count, jnp.int32)
    return np.asarray(_greedy_k_center(rows, first, size))


@functools.partial(jax.jit, static_argnums=2)
def _greedy_k_center(points, first, size: int):
    squared = jnp.sum(jnp.square(points), -1)

    def distances(j):  # |p - p_j|^2 as a matrix-vector product: 4x quicker on XLA:CPU than the differences
        return jnp.maximum(squared - 2.0 * (points @ points[j]) + squared[j], 0.0)

    def pick(i, state):
        nearest, index = state
        farthest = jnp.argmax(nearest).astype(jnp.int32)
        return jnp.minimum(nearest, distances(farthest)), index.at[i].set(farthest)

    index = jnp.zeros((size,), jnp.int32).at[0].set(first)
    return jax.lax.fori_loop(1, size, pick, (distances(first), index))[1]


def scale_to_arrays(scale) -> dict:
    """The map scale (`map_scale`) as a named array for the run's fitted state."""
    return {_SCALE: np.asarray(scale, np.float32)}


def scale_from_arrays(arrays: dict) -> np.ndarray:
    """The map scale stored by `scale_to_arrays`; a one-line ScoreRuleError when missing."""
    if _SCALE not in arrays:
        raise ScoreRuleError("score.feature_map needs the scale of held-out normals' maps, and the run has none: "
                             "fit it with `fmjax calibrate --run RUN` or train again")
    return np.asarray(arrays[_SCALE], np.float32)
