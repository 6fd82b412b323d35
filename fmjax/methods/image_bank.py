"""Image features from a method's own network and their memory bank, shared by the
methods whose U-Net encodes a clean image (Flow Mismatching at t = 1, RADAR at t = 0).

A one-class task (a new kind of object, not a local defect) is semantic: what is wrong is
the whole image, which a sum of local errors reads poorly. The trained network also
encodes each image in its middle block; a test image far from the training normals there
is new:

  f(y) = [mean_p h(y)(p), std_p h(y)(p)]       h: the output of the block `mid_res_1`
  z(y) = (f(y) - mean) / std                    mean, std: over the memory bank
  knn(y) = (1/k) sum of the k smallest |z(y) - z_m|^2 over the bank's z_m

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

__all__ = ["Bank", "LAYER", "bank_from_features", "build_features_fn", "draw_bank", "empty_bank", "from_arrays",
           "knn_scores", "to_arrays"]

LAYER = "mid_res_1"
STD_FLOOR = 1e-6
PREFIX = "features_"


class Bank(NamedTuple):
    """The memory bank: features float32 [M, D] of training normals, already standardised
    by mean and std float32 [D] (their own)."""

    features: object
    mean: object
    std: object


def empty_bank(dim: int = 1) -> Bank:
    """A bank of one zero row (a constant for scorers that do not use features)."""
    return Bank(np.zeros((1, dim), np.float32), np.zeros(dim, np.float32), np.ones(dim, np.float32))


def build_features_fn(module, conditional: bool, clean_time: float):
    """features_fn(params, images_u8 [B,H,W,C], class_ids [B]) -> f float32 [B, 2 * channels]
    of the U-Net `module`: per-channel spatial mean and std of its middle block, given the
    clean image at the network's time input `clean_time` (a flow's t = 1, a DDPM's t = 0).
    Under jit the decoder is dead code and is not computed."""

    def capture(mdl, method_name):
        return mdl.name == LAYER and method_name == "__call__"

    def features_fn(params, images_u8, class_ids):
        x = to_model_range(images_u8)
        t = jnp.full((x.shape[0],), clean_time, jnp.float32)
        _, state = module.apply(params, x, t, class_ids if conditional else None, capture_intermediates=capture,
                                mutable=["intermediates"])
        h = state["intermediates"][LAYER]["__call__"][0].astype(jnp.float32)
        return jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.std(h, axis=(1, 2))], axis=-1)

    return features_fn


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
    mean, std = features.mean(0), np.maximum(features.std(0), STD_FLOOR)
    return Bank(((features - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32))


def draw_bank(features, trained, size: int, seed: int) -> Bank:
    """The bank of at most `size` of the training images `trained` (a Split; a draw from
    `seed` when there are more), read by features(images uint8 [n,H,W,C], class_ids [n])
    -> [n, D]."""
    picked = np.arange(len(trained))
    if len(trained) > size:
        picked = np.sort(np.random.default_rng([seed, 13]).permutation(len(trained))[:size])
    return bank_from_features(features(trained.images[picked], trained.class_ids[picked]))


def to_arrays(bank: Bank, prefix: str = PREFIX) -> dict:
    """The bank as named arrays for the run's fitted state (calibration.npz)."""
    return {prefix + name: np.asarray(value, np.float32) for name, value in bank._asdict().items()}


def from_arrays(arrays: dict, prefix: str = PREFIX) -> Bank:
    """The bank stored by `to_arrays`; a one-line ScoreRuleError when the run has none."""
    names = [prefix + f for f in Bank._fields]
    if any(n not in arrays for n in names):
        setting = "score.feature_knn" if prefix == PREFIX else "score.feature_map"
        raise ScoreRuleError(f"{setting} needs the features of the training normals, and the run has none: "
                             "fit them with `fmjax calibrate --run RUN` or train again")
    return Bank(*(np.asarray(arrays[n], np.float32) for n in names))
