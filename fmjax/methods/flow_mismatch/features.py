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
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ScoreRuleError
from fmjax.flow import to_model_range

__all__ = ["Bank", "LAYER", "bank_from_features", "build_features_fn", "empty_bank", "from_arrays", "knn_scores",
           "to_arrays"]

LAYER = "mid_res_1"
_STD_FLOOR = 1e-6
_PREFIX = "features_"


class Bank(NamedTuple):
    """The memory bank: features float32 [M, D] of training normals, already standardised
    by mean and std float32 [D] (their own)."""

    features: object
    mean: object
    std: object


def empty_bank(dim: int = 1) -> Bank:
    """A bank of one zero row (a constant for scorers that do not use features)."""
    return Bank(np.zeros((1, dim), np.float32), np.zeros(dim, np.float32), np.ones(dim, np.float32))


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


def to_arrays(bank: Bank) -> dict:
    """The bank as named arrays for the run's fitted state (calibration.npz)."""
    return {_PREFIX + name: np.asarray(value, np.float32) for name, value in bank._asdict().items()}


def from_arrays(arrays: dict) -> Bank:
    """The bank stored by `to_arrays`; a one-line ScoreRuleError when the run has none."""
    names = [_PREFIX + f for f in Bank._fields]
    if any(n not in arrays for n in names):
        raise ScoreRuleError("score.feature_knn needs the features of the training normals, and the run has none: "
                             "fit them with `fmjax calibrate --run RUN` or train again")
    return Bank(*(np.asarray(arrays[n], np.float32) for n in names))
