"""Image scores from the flow network's own features (score.feature_knn > 0).

A one-class task (a new kind of object, not a local defect) is semantic: what is wrong
is the whole image, and the mismatch map, a sum of local errors, reads it poorly. The
trained velocity network also encodes each image in its middle block. The image score
is then the distance of a test image's middle-block features, taken at t = 1 (the clean
image, no noise), to those of the k nearest training normals:

  f(y) = [mean_p h(y)(p), std_p h(y)(p)]       h: the output of the block `mid_res_1`
  z(y) = (f(y) - mean) / std                    mean, std: over the memory bank
  score(y) = (1/k) sum of the k smallest |z(y) - z_m|^2 over the bank's z_m

The bank holds the features of the images the network trained on (never the held-out
normals the thresholds come from), at most score.feature_bank of them. The maps stay
the mismatch maps.

Maps from the same features (score.feature_map = w > 0): the encoder's outputs at its
second and third resolution (`patch_layers`), pooled to the coarser grid and averaged
over 3x3 neighbourhoods, give each position of the clean image a feature vector; its
squared distance to the nearest row of a bank of such vectors from the training normals,
resized to the image and smoothed, is the feature map F. When the training normals give
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

__all__ = ["Bank", "Banks", "LAYER", "PATCH_PREFIX", "bank_from_features", "build_features_fn",
           "build_patch_features_fn", "combine_maps", "coreset", "empty_bank", "from_arrays", "knn_scores", "map_scale",
           "nearest_maps", "neutral_banks", "patch_layers", "scale_from_arrays", "scale_to_arrays", "to_arrays"]

LAYER = "mid_res_1"
_STD_FLOOR = 1e-6
_PREFIX = "features_"
PATCH_PREFIX = "patches_"
_SCALE = "feature_map_scale"


class Bank(NamedTuple):
    """The memory bank: features float32 [M, D] of training normals, already standardised
    by mean and std float32 [D] (their own)."""

    features: object
    mean: object
    std: object


class Banks(NamedTuple):
    """What the feature scores need, fitted on normal images: `images` (the image bank of
    score.feature_knn), `patches` (the patch bank of score.feature_map) and `scale`
    float32 [4] (c_M, s_M, c_F, s_F of the maps, `map_scale`)."""

    images: Bank
    patches: Bank
    scale: object


def empty_bank(dim: int = 1) -> Bank:
    """A bank of one zero row (a constant for scorers that do not use features)."""
    return Bank(np.zeros((1, dim), np.float32), np.zeros(dim, np.float32), np.ones(dim, np.float32))


def neutral_banks() -> Banks:
    """Placeholders for the settings that use no features (the map scale changes nothing)."""
    return Banks(empty_bank(), empty_bank(), np.array([0, 1, 0, 1], np.float32))


def build_features_fn(module, conditional: bool):
    """features_fn(params, images_u8 [B,H,W,C], class_ids [B]) -> f float32 [B, 2 * channels]
    of the U-Net `module`: per-channel spatial mean and std of its middle block at t = 1.
    Under jit the decoder is dead code and is not computed."""

    def capture(mdl, method_name):
        return mdl.name == LAYER and method_name == "__call__"

    def features_fn(params, images_u8, class_ids):
        x = to_model_range(images_u8)
        t = jnp.ones((x.shape[0],), jnp.float32)
        _, state = module.apply(params, x, t, class_ids if conditional else None, capture_intermediates=capture,
                                mutable=["intermediates"])
        h = state["intermediates"][LAYER]["__call__"][0].astype(jnp.float32)
        return jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.std(h, axis=(1, 2))], axis=-1)

    return features_fn


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
    z = ((patch_features - bank.mean) / bank.std).reshape(-1, d)
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
    return np.array([v for m in parts for v in (m.mean(), max(m.std(), _STD_FLOOR))], np.float32)


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


def knn_scores(features, bank: Bank, k: int):
    """Mean squared distance of standardised features [B, D] to their k nearest bank rows
    [M, D] -> [B] (k is capped at M)."""
    z = (features - bank.mean) / bank.std
    d2 = (jnp.sum(jnp.square(z), -1)[:, None] - 2.0 * z @ bank.features.T
          + jnp.sum(jnp.square(bank.features), -1)[None, :])
    nearest = -jax.lax.top_k(-d2, min(k, bank.features.shape[0]))[0]
    return jnp.mean(jnp.maximum(nearest, 0.0), axis=-1)


def bank_from_features(features) -> Bank:
    """The bank of training normals' features float [M, D], standardised by their own
    mean and std."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 1:
        raise ScoreRuleError(f"a feature bank needs features [M >= 1, D], got shape {list(features.shape)}")
    mean, std = features.mean(0), np.maximum(features.std(0), _STD_FLOOR)
    return Bank(((features - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32))


def to_arrays(bank: Bank, prefix: str = _PREFIX) -> dict:
    """The bank as named arrays for the run's fitted state (calibration.npz)."""
    return {prefix + name: np.asarray(value, np.float32) for name, value in bank._asdict().items()}


def scale_to_arrays(scale) -> dict:
    """The map scale (`map_scale`) as a named array for the run's fitted state."""
    return {_SCALE: np.asarray(scale, np.float32)}


def from_arrays(arrays: dict, prefix: str = _PREFIX) -> Bank:
    """The bank stored by `to_arrays`; a one-line ScoreRuleError when the run has none."""
    names = [prefix + f for f in Bank._fields]
    if any(n not in arrays for n in names):
        setting = "score.feature_knn" if prefix == _PREFIX else "score.feature_map"
        raise ScoreRuleError(f"{setting} needs the features of the training normals, and the run has none: "
                             "fit them with `fmjax calibrate --run RUN` or train again")
    return Bank(*(np.asarray(arrays[n], np.float32) for n in names))


def scale_from_arrays(arrays: dict) -> np.ndarray:
    """The map scale stored by `scale_to_arrays`; a one-line ScoreRuleError when missing."""
    if _SCALE not in arrays:
        raise ScoreRuleError("score.feature_map needs the scale of held-out normals' maps, and the run has none: "
                             "fit it with `fmjax calibrate --run RUN` or train again")
    return np.asarray(arrays[_SCALE], np.float32)
