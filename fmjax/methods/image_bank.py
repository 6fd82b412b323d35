"""Image features from a method's own network and their memory bank, shared by the
methods whose U-Net encodes a clean image (Flow Mismatching at t = 1, RADAR at t = 0).

A one-class task (a new kind of object, not a local defect) is semantic: what is wrong is
the whole image, which a sum of local errors reads poorly. The trained network also
encodes each image in its middle block; a test image far from the training normals there
is new:

  f(y) = [mean_p h(y)(p), std_p h(y)(p)]       h: the output of the block `mid_res_1`
     or, on a grid of g x g cells, h averaged over each cell (an aligned object's layout)
  z(y) = ((f(y) - mean) / std) W                mean, std: over the memory bank
  knn(y) = (1/k) sum of the k smallest |z(y) - z_m|^2 over the bank's z_m

W is the identity, or, for a whitened bank, W W^T = (C + ridge I)^-1 with C the bank's
correlation matrix: distances then count correlated features once (a Mahalanobis
distance to each neighbour).

The bank holds the features of images the network trained on, never the held-out normals
the thresholds come from.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ScoreRuleError
from fmjax.flow import to_model_range

__all__ = ["Bank", "LAYER", "WHITEN_RIDGE", "bank_from_features", "build_features_fn", "draw_bank", "empty_bank",
           "from_arrays", "knn_scores", "standardize", "to_arrays", "whitening"]

LAYER = "mid_res_1"
STD_FLOOR = 1e-6
WHITEN_RIDGE = 0.01  # added to the correlation matrix's diagonal before it is inverted
PREFIX = "features_"


class Bank(NamedTuple):
    """The memory bank: features float32 [M, D] of training normals, already standardised
    by mean and std float32 [D] (their own) and mapped by `whiten` float32 [D, D] (the
    identity unless the bank is whitened)."""

    features: object
    mean: object
    std: object
    whiten: object


def empty_bank(dim: int = 1) -> Bank:
    """A bank of one zero row (a constant for scorers that do not use features)."""
    return Bank(np.zeros((1, dim), np.float32), np.zeros(dim, np.float32), np.ones(dim, np.float32),
                np.eye(dim, dtype=np.float32))


def standardize(features, bank: Bank):
    """Features [..., D] in the bank's coordinates: ((f - mean) / std) @ whiten."""
    return ((features - bank.mean) / bank.std) @ bank.whiten


def build_features_fn(module, conditional: bool, clean_time: float, grid: int = 0):
    """features_fn(params, images_u8 [B,H,W,C], class_ids [B]) -> f float32 [B, D] of the
    U-Net `module`'s middle block, given the clean image at the network's time input
    `clean_time` (a flow's t = 1, a DDPM's t = 0): with grid 0 its per-channel spatial mean
    and std (D = 2 * channels), with grid g its mean over each of g x g equal cells
    (D = g * g * channels; the block's size must be a multiple of g). Under jit the
    decoder is dead code and is not computed."""

    def capture(mdl, method_name):
        return mdl.name == LAYER and method_name == "__call__"

    def features_fn(params, images_u8, class_ids):
        x = to_model_range(images_u8)
        t = jnp.full((x.shape[0],), clean_time, jnp.float32)
        _, state = module.apply(params, x, t, class_ids if conditional else None, capture_intermediates=capture,
                                mutable=["intermediates"])
        h = state["intermediates"][LAYER]["__call__"][0].astype(jnp.float32)
        if not grid:
            return jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.std(h, axis=(1, 2))], axis=-1)
        b, height, width, channels = h.shape
        if height % grid or width % grid:
            raise ScoreRuleError(f"score.feature_grid={grid} needs the middle block's size ({height}x{width}) to be "
                                 f"a multiple of {grid}: choose a divisor of it, or 0")
        cells = h.reshape(b, grid, height // grid, grid, width // grid, channels).mean(axis=(2, 4))
        return cells.reshape(b, -1)

    return features_fn


def knn_scores(features, bank: Bank, k: int):
    """Mean squared distance of standardised features [B, D] to their k nearest bank rows
    [M, D] -> [B] (k is capped at M)."""
    z = standardize(features, bank)
    d2 = (jnp.sum(jnp.square(z), -1)[:, None] - 2.0 * z @ bank.features.T
          + jnp.sum(jnp.square(bank.features), -1)[None, :])
    nearest = -jax.lax.top_k(-d2, min(k, bank.features.shape[0]))[0]
    return jnp.mean(jnp.maximum(nearest, 0.0), axis=-1)


def whitening(z) -> np.ndarray:
    """W float64 [D, D] with W W^T = (C + WHITEN_RIDGE I)^-1, C = z^T z / M the correlation
    matrix of standardised rows z [M, D]."""
    eigenvalues, vectors = np.linalg.eigh(z.T @ z / len(z) + WHITEN_RIDGE * np.eye(z.shape[1]))
    return vectors / np.sqrt(eigenvalues)


def bank_from_features(features, whiten: bool = False) -> Bank:
    """The bank of training normals' features float [M, D], standardised by their own
    mean and std, and whitened by their own correlations when `whiten`."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 1:
        raise ScoreRuleError(f"a feature bank needs features [M >= 1, D], got shape {list(features.shape)}")
    mean, std = features.mean(0), np.maximum(features.std(0), STD_FLOOR)
    z = (features - mean) / std
    transform = whitening(z) if whiten else np.eye(z.shape[1])
    return Bank(*(np.asarray(v, np.float32) for v in (z @ transform, mean, std, transform)))


def draw_bank(features, trained, size: int, seed: int, whiten: bool = False) -> Bank:
    """The bank (`bank_from_features`) of at most `size` of the training images `trained`
    (a Split; a draw from `seed` when there are more), read by features(images uint8
    [n,H,W,C], class_ids [n]) -> [n, D]."""
    picked = np.arange(len(trained))
    if len(trained) > size:
        picked = np.sort(np.random.default_rng([seed, 13]).permutation(len(trained))[:size])
    return bank_from_features(features(trained.images[picked], trained.class_ids[picked]), whiten)


def to_arrays(bank: Bank, prefix: str = PREFIX) -> dict:
    """The bank as named arrays for the run's fitted state (calibration.npz)."""
    return {prefix + name: np.asarray(value, np.float32) for name, value in bank._asdict().items()}


def from_arrays(arrays: dict, prefix: str = PREFIX) -> Bank:
    """The bank stored by `to_arrays`; a one-line ScoreRuleError when the run has none. A
    bank stored without `whiten` (before banks could be whitened) is not whitened."""
    names = [prefix + f for f in Bank._fields]
    if any(n not in arrays for n in names[:3]):
        setting = "score.feature_knn" if prefix == PREFIX else "score.feature_map"
        raise ScoreRuleError(f"{setting} needs the features of the training normals, and the run has none: "
                             "fit them with `fmjax calibrate --run RUN` or train again")
    features, mean, std = (np.asarray(arrays[n], np.float32) for n in names[:3])
    whiten = arrays.get(names[3])
    return Bank(features, mean, std, np.eye(len(mean), dtype=np.float32) if whiten is None
                else np.asarray(whiten, np.float32))
