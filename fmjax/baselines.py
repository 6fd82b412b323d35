"""Non-learned floors for the method comparisons: no network, no pretrained features.

PCAFloor  PCA fitted on the normal images' pixels; map = squared residual of the
          reconstruction summed over channels, image score max_plus_top1.
PatchNN   raw-pixel patch nearest neighbour: a memory bank of p x p patches of the normal
          images (every position, subsampled at random to a fixed bank size); each test
          patch's L2 distance to its nearest bank patch (exact brute-force search); a
          pixel's value is the mean distance of the patches that cover it; image score =
          max of the map.
Both take uint8 images [N, H, W, C] (as every reader yields them), scale them to [-1, 1]
and return (maps float32 [N, H, W], scores float32 [N]), higher = more anomalous.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError

__all__ = ["PCAFloor", "PatchNN", "average_over_patches", "extract_patches", "nearest_distances"]


def _unit(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ConfigError(f"images must be [N, H, W, C], got shape {list(images.shape)}")
    return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class PCAFloor:
    """components: the fraction of variance kept if < 1, else the number of components
    (at most N - 1 of the fitting images)."""

    components: float = 0.9
    pca: object = None

    def fit(self, images) -> "PCAFloor":
        from sklearn.decomposition import PCA

        x = _unit(images).reshape(len(images), -1).astype(np.float64)
        n = self.components if self.components < 1 else int(min(self.components, len(x) - 1))
        self.pca = PCA(n_components=n, svd_solver="full", random_state=0).fit(x)
        return self

    def score(self, images):
        from fmjax.methods.maps import image_score

        x = _unit(images).reshape(len(images), -1).astype(np.float64)
        residual = x - self.pca.inverse_transform(self.pca.transform(x))
        maps = np.square(residual).reshape(np.shape(images)).sum(-1).astype(np.float32)
        return maps, np.asarray(image_score(jnp.asarray(maps), "max_plus_top1"))


def extract_patches(images, patch: int) -> np.ndarray:
    """Every p x p patch (stride 1) of images float [N, H, W, C]:
    [N, H - p + 1, W - p + 1, p * p * C], row-major over (dy, dx, c)."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (patch, patch), axis=(1, 2))
    # [N, H', W', C, p, p] -> [N, H', W', p, p, C]
    return np.ascontiguousarray(np.moveaxis(windows, 3, -1)).reshape(windows.shape[:3] + (-1,))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _nearest(queries, bank, bank_sq, chunk: int):
    """Squared distance of each query [Q, D] to its nearest bank row [B, D] (Q a multiple
    of chunk): the neighbour is found with |q|^2 + |b|^2 - 2 q.b, its distance then
    recomputed as |q - b|^2 (no cancellation)."""
    def one(q):
        cross = jnp.dot(q, bank.T, precision=jax.lax.Precision.HIGHEST)
        best = jnp.argmin(bank_sq[None, :] - 2.0 * cross, axis=1)
        return jnp.sum(jnp.square(q - bank[best]), axis=1)

    return jax.lax.map(one, queries.reshape(-1, chunk, queries.shape[-1])).reshape(-1)


def nearest_distances(queries, bank, chunk: int = 0) -> np.ndarray:
    """Exact nearest-neighbour L2 distance of each row of queries [Q, D] among the rows of
    bank [B, D] (brute force, `chunk` queries at a time; 0: as many as keep the chunk's
    distance matrix near 2^24 entries): float32 [Q]."""
    queries, bank = np.asarray(queries, np.float32), jnp.asarray(bank, jnp.float32)
    q = len(queries)
    chunk = chunk or int(np.clip(2 ** 24 // max(len(bank), 1), 1, max(q, 1)))
    padded = np.zeros((-(-q // chunk) * chunk, queries.shape[1]), np.float32)
    padded[:q] = queries
    bank_sq = jnp.sum(jnp.square(bank), axis=1)
    return np.sqrt(np.asarray(_nearest(jnp.asarray(padded), bank, bank_sq, chunk))[:q])


def average_over_patches(values, patch: int) -> np.ndarray:
    """Per-patch values [N, H - p + 1, W - p + 1] (at each patch's top-left corner) ->
    per-pixel map [N, H, W]: each pixel the mean value of the p x p patches covering it."""
    values = np.asarray(values, np.float64)
    pad = ((0, 0), (patch - 1, patch - 1), (patch - 1, patch - 1))

    def box_sum(x):  # sum over every p x p window of x zero-padded by p - 1
        c = np.pad(np.pad(x, pad), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
        return c[:, patch:, patch:] - c[:, :-patch, patch:] - c[:, patch:, :-patch] + c[:, :-patch, :-patch]

    return (box_sum(values) / box_sum(np.ones_like(values))).astype(np.float32)


@dataclasses.dataclass
class PatchNN:
    """patch: side p; bank_size: patches kept (drawn at random with `seed` from every
    position of every fitting image; all of them when there are fewer); smooth_sigma:
    Gaussian smoothing of the map in pixels (0 = off)."""

    patch: int = 7
    bank_size: int = 16384
    smooth_sigma: float = 0.0
    seed: int = 0
    bank: np.ndarray | None = None

    def __post_init__(self):
        if self.patch < 1:
            raise ConfigError(f"patch nearest neighbour: the patch side must be >= 1, got {self.patch}")
        if self.bank_size < 1 or not self.smooth_sigma >= 0:
            raise ConfigError("patch nearest neighbour: bank_size must be >= 1 and smooth_sigma >= 0")

    def fit(self, images) -> "PatchNN":
        x = _unit(images)
        if min(x.shape[1:3]) < self.patch:
            raise ConfigError(f"patch {self.patch} is larger than the images {x.shape[1]}x{x.shape[2]}")
        patches = extract_patches(x, self.patch).reshape(-1, self.patch * self.patch * x.shape[-1])
        keep = np.random.default_rng(self.seed).permutation(len(patches))[:self.bank_size]
        self.bank = patches[np.sort(keep)]
        return self

    def score(self, images, batch: int = 64):
        """images uint8 [N, H, W, C] -> (maps float32 [N, H, W], scores float32 [N]), in
        batches of `batch` images."""
        from fmjax.methods.maps import gaussian_smooth

        if self.bank is None:
            raise ConfigError("patch nearest neighbour: fit it on normal images before scoring")
        x = _unit(images)
        n, h, w = x.shape[:3]
        maps = np.empty((n, h, w), np.float32)
        for start in range(0, n, batch):
            patches = extract_patches(x[start:start + batch], self.patch)
            near = nearest_distances(patches.reshape(-1, patches.shape[-1]), self.bank).reshape(patches.shape[:3])
            maps[start:start + batch] = average_over_patches(near, self.patch)
        if self.smooth_sigma > 0:
            maps = np.asarray(gaussian_smooth(jnp.asarray(maps), self.smooth_sigma))
        return maps, maps.reshape(n, -1).max(axis=1)
