"""Flow Mismatching scorer (docs/method.md, section 1).

For a test image y, K noise images eps_k and T interior times t_j = j / (T + 1):
  delta_{j,k}(p) = sum_c ( v(x, t_j) - (y - eps_k) )^2,   x = (1 - t_j) eps_k + t_j y,
  a_j(p) = Agg_k delta_{j,k}(p) (smoothed),   H = map rule of the a_j (normalize.py; the
  paper's: (1/T) sum_j w(t_j) a_j(p)),         image score = rule(H), or with
  score.feature_knn > 0 the distance of the network's features to the training normals'
  (features.py); with score.feature_map > 0, H mixes in the map of the encoder's features
  against the training normals' (features.py).
All B*T*K network calls of a batch of images run inside one jitted function, in chunks of
a fixed number of network inputs, so memory stays bounded and nothing recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fmjax import xla_options
from fmjax.distributed.mesh import DATA_AXIS, data_mesh, replicated, rows
from fmjax.errors import ScoreRuleError
from fmjax.flow import path_point, target_velocity, to_model_range
from fmjax.methods.base import ScoringProgram
from fmjax.methods.batches import ImageBatches, check_images
from fmjax.methods.flow_mismatch import features as feat
from fmjax.methods.flow_mismatch import learned
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.chunking import chunk_size_for_budget, even_chunk
from fmjax.methods.flow_mismatch.order import sort_axis
from fmjax.methods.flow_mismatch.settings import check_map_rule, check_time_weight, parse_aggregate
from fmjax.methods.maps import gaussian_smooth, image_score
from fmjax.methods.rules import parse_image_score

__all__ = ["Scorer", "aggregate_ordered", "aggregate_paths", "aggregate_times", "delta_chunks", "grid_index",
           "grid_to_delta", "heat_maps", "interior_times", "mismatch_delta", "path_noise", "per_time_maps",
           "time_weights"]


# ----------------------------------------------------------------------------- rules

def interior_times(num_times: int) -> np.ndarray:
    """t_j = j / (T + 1), j = 1..T, float32 [T]."""
    return (np.arange(1, num_times + 1) / (num_times + 1)).astype(np.float32)


def path_noise(key, num_paths: int, image_shape) -> jax.Array:
    """The K noise images eps_k, float32 [K, H, W, C].

    One set is shared by every image (common random numbers): an image's score depends
    only on the image and the key, never on its position in a batch.
    """
    return jax.random.normal(key, (num_paths,) + tuple(image_shape), jnp.float32)


def aggregate_paths(delta, spec: str, axis: int = -3):
    """Reduces the path axis of `delta` (default [..., K, H, W]) with rule `spec`."""
    kind, _ = parse_aggregate(spec, delta.shape[axis])
    ordered = None if kind == "mean" else sort_axis(delta, axis)  # = jnp.sort, as a sorting network
    return aggregate_ordered(delta, ordered, spec, axis)


def aggregate_ordered(delta, ordered, spec: str, axis: int = -3):
    """`aggregate_paths` given `ordered`, delta sorted along `axis` (None for 'mean'): rules
    that share K share one sort."""
    num_paths = delta.shape[axis]
    kind, value = parse_aggregate(spec, num_paths)
    if kind == "mean":
        return jnp.mean(delta, axis=axis)
    if kind == "rank":
        return jnp.take(ordered, value - 1, axis=axis)
    if kind == "median":
        lo, hi = (num_paths - 1) // 2, num_paths // 2
        return 0.5 * (jnp.take(ordered, lo, axis=axis) + jnp.take(ordered, hi, axis=axis))
    kept = jax.lax.slice_in_dim(ordered, value, num_paths - value, axis=axis % delta.ndim)
    return jnp.mean(kept, axis=axis)


def time_weights(times, rule: str):
    """w(t_j): 't2' -> t^2, 'none' -> 1.  times [T] -> [T]."""
    times = jnp.asarray(times, jnp.float32)
    if rule == "t2":
        return jnp.square(times)
    check_time_weight(rule)
    return jnp.ones_like(times)


def aggregate_times(per_time, times, rule: str):
    """(1/T) sum_j w(t_j) A_j.  per_time [..., T, H, W] -> [..., H, W]."""
    w = time_weights(times, rule)
    return jnp.einsum("...thw,t->...hw", per_time, w) / w.shape[0]


# ----------------------------------------------------------------------------- mismatch

def grid_index(num_images: int, num_times: int, num_paths: int, chunk_size: int, num_shards: int = 1) -> np.ndarray:
    """(image, time, path) of every network input, int32 [num_chunks, chunk_size, 3].

    Item order is image-major, then time, then path.  num_chunks = ceil(B*T*K / chunk_size)
    rounded up to a multiple of num_shards; padding repeats early items.
    """
    total = num_images * num_times * num_paths
    num_chunks = -(-total // chunk_size)
    num_chunks = -(-num_chunks // num_shards) * num_shards
    flat = np.arange(num_chunks * chunk_size) % total
    b_idx = flat // (num_times * num_paths)
    t_idx = (flat // num_paths) % num_times
    k_idx = flat % num_paths
    return np.stack([b_idx, t_idx, k_idx], -1).reshape(num_chunks, chunk_size, 3).astype(np.int32)


def delta_chunks(velocity_fn, images, noise, times, index, class_ids=None):
    """Per-pixel mismatch of the network inputs named by `index` [n_chunks, chunk, 3]
    (from grid_index), one sequential network call per chunk -> float32 [n_chunks, chunk, H, W].

    velocity_fn(x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].
    images: float [B,H,W,C] in [-1, 1]; noise: [K,H,W,C]; times: [T]; class_ids: int [B] or None.
    """
    def one_item(y, eps, t):
        return path_point(eps[None], y[None], t[None])[0], target_velocity(eps, y)

    def chunk(idx):
        y = images[idx[:, 0]]
        eps = noise[idx[:, 2]]
        t = times[idx[:, 1]]
        x, u = jax.vmap(one_item)(y, eps, t)
        v = velocity_fn(x, t, None if class_ids is None else class_ids[idx[:, 0]])
        return jnp.sum(jnp.square(v.astype(jnp.float32) - u), axis=-1)

    return jax.lax.map(chunk, jnp.asarray(index))


def grid_to_delta(chunks, num_images: int, num_times: int, num_paths: int):
    """delta_chunks output [n_chunks, chunk, H, W] -> delta [B, T, K, H, W] (padding dropped)."""
    total = num_images * num_times * num_paths
    flat = chunks.reshape((-1,) + chunks.shape[2:])[:total]
    return flat.reshape((num_images, num_times, num_paths) + chunks.shape[2:])


def mismatch_delta(velocity_fn, images, noise, times, chunk_size: int, class_ids=None):
    """Per-pixel mismatch for every (image, time, path).

    velocity_fn(x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].
    images: float [B,H,W,C] in [-1, 1]; noise: [K,H,W,C]; times: [T]; class_ids: int [B] or None.
    Returns delta float32 [B, T, K, H, W].  The B*T*K network inputs are evaluated in
    ceil(B*T*K / chunk_size) sequential calls of exactly chunk_size inputs each.
    """
    num_images, num_paths, num_times = images.shape[0], noise.shape[0], times.shape[0]
    index = grid_index(num_images, num_times, num_paths, chunk_size)
    chunks = delta_chunks(velocity_fn, images, noise, times, index, class_ids)
    return grid_to_delta(chunks, num_images, num_times, num_paths)


def per_time_maps(delta, aggregate: str, smooth_sigma: float = 0.0):
    """delta [B, T, K, H, W] -> a [B, T, H, W]: paths aggregated, each map smoothed."""
    per_time = aggregate_paths(delta, aggregate, axis=2)
    if smooth_sigma <= 0:
        return per_time
    b, t, h, w = per_time.shape
    return gaussian_smooth(per_time.reshape(b * t, h, w), smooth_sigma).reshape(b, t, h, w)


def heat_maps(delta, times, aggregate: str, time_weight: str, smooth_sigma: float = 0.0, normalize: str = "none",
              map_rule: str = "weighted", stats: norm.Stats | None = None):
    """delta [B, T, K, H, W] -> maps H [B, H, W]: paths aggregated, smoothed, combined over
    times by `map_rule` with the normal-image statistics `stats` (normalize.py)."""
    if normalize == "none" and map_rule == "weighted":
        # the paper's rule; smoothing the sum equals summing the smoothed maps (linear)
        per_time = aggregate_paths(delta, aggregate, axis=2)
        return gaussian_smooth(aggregate_times(per_time, times, time_weight), smooth_sigma)
    per_time = per_time_maps(delta, aggregate, smooth_sigma)
    stats = norm.neutral_stats(len(times)) if stats is None else stats
    return norm.mismatch_map(per_time, time_weights(times, time_weight), normalize, map_rule, stats)


# ----------------------------------------------------------------------------- scorer

_FEATURE_BATCH = 16  # images per device per call of `Scorer.features` (one network call each)


class Scorer:
    """The one jitted scoring path used by evaluate, predict, bench and the experiments.

    apply_fn(params, x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].
    Images are spread over `devices` (default: all local devices); each device scores
    `config.image_batch` images per call, so every call has the same shapes.  A request
    with fewer images than devices spreads its (time, path) grid over the devices instead,
    so none sits idle (one compiled program per such request size).
    `config.chunk_size` is the most network inputs per call, evened out over each device's
    calls (`chunk_for`); 0 picks it from `config.memory_budget_mb` on the first call
    (`chunk_size_for_budget`) and `self.config` then holds the chosen size.
    features_fn(params, images_u8, class_ids) -> [n, D] (`image_bank.build_features_fn`):
    the network's features, needed when config.feature_knn > 0; patch_fn(params,
    images_u8, class_ids) -> [n, h, w, D] (`features.build_patch_features_fn`): its
    features per position, needed when config.feature_map > 0.
    """

    def __init__(self, apply_fn, config, image_shape, devices=None, features_fn=None, patch_fn=None):
        self.config = config
        self.image_shape = tuple(image_shape)
        self.apply_fn = apply_fn
        self.features_fn = features_fn
        self.patch_fn = patch_fn
        if config.feature_knn and features_fn is None:
            raise ScoreRuleError("score.feature_knn needs the network's features: build the scorer through its method")
        if config.feature_map and patch_fn is None:
            raise ScoreRuleError("score.feature_map needs the network's features: build the scorer through its method")
        parse_aggregate(config.aggregate, config.num_paths)
        parse_image_score(config.image_score)
        time_weights(jnp.zeros(1), config.time_weight)
        check_map_rule(config.normalize, config.map_rule)
        self.noise = path_noise(jax.random.PRNGKey(config.seed), config.num_paths, self.image_shape)
        self.times = jnp.asarray(interior_times(config.num_times))
        self.devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = data_mesh(self.devices)
        self._batches = None
        self._feature_batches = {}
        self._feature_map_fn = None
        self._knn_fn = None
        self._grids = {}

    def _build(self, params):
        """The per-image-batch programs; settles chunk_size = 0 from the memory budget first."""
        if self._batches is not None:
            return
        cfg = self.config
        if cfg.chunk_size == 0:
            cfg = self.config = dataclasses.replace(cfg, chunk_size=chunk_size_for_budget(
                self.apply_fn, params, self.image_shape, cfg.memory_budget_mb * 2 ** 20,
                max_chunk=cfg.image_batch * cfg.num_times * cfg.num_paths,
                fixed_bytes=4 * cfg.image_batch * cfg.num_times * cfg.num_paths * math.prod(self.image_shape[:2])))

        chunk = self.chunk_for(cfg.image_batch * len(self.devices))

        def local(mode):
            def fn(params, images_u8, class_ids, noise, times, stats, banks):
                velocity = lambda x, t, y: self.apply_fn(params, x, t, y)
                delta = mismatch_delta(velocity, to_model_range(images_u8), noise, times, chunk, class_ids)
                return self._finish(mode, delta, times, stats, banks, params, images_u8, class_ids)
            return fn

        self._local = {mode: local(mode) for mode in self._OUTPUTS}
        self._batches = {mode: ImageBatches(self._local[mode], self.image_shape, cfg.image_batch, 4, outputs,
                                            self.devices) for mode, outputs in self._OUTPUTS.items()}

    def program(self, params, fitted=None) -> ScoringProgram:
        """The per-device function `score` runs on every device, for export
        (`fmjax.methods.base.ScoringProgram`; settles chunk_size = 0 first); the
        normalisation statistics and the feature banks the settings need travel among its
        constants."""
        self._build(params)
        local, stats, banks = self._local["maps"], self.stats(fitted), self.banks(fitted)
        stats = norm.neutral_stats(self.config.num_times) if stats is None else stats
        return ScoringProgram(fn=lambda params, consts, images_u8, class_ids: local(
            params, images_u8, class_ids, consts["noise"], consts["times"], consts["stats"], consts["banks"]),
            consts={"noise": self.noise, "times": self.times, "stats": jax.tree.map(np.asarray, stats),
                    "banks": jax.tree.map(np.asarray, banks)},
            batch=self.config.image_batch)

    def chunk_for(self, num_images: int) -> int:
        """Network inputs per call when `num_images` images are scored at once (after the
        first call when config.chunk_size = 0): config.chunk_size at most, evened out over
        each device's calls (`even_chunk`)."""
        cfg, shards = self.config, len(self.devices)
        if cfg.chunk_size == 0:
            raise ScoreRuleError("the chunk is settled from score.memory_budget_mb by the first scoring call")
        if num_images >= shards:  # whole images per device, config.image_batch per call
            return even_chunk(cfg.image_batch * cfg.num_times * cfg.num_paths, cfg.chunk_size)
        return even_chunk(-(-num_images * cfg.num_times * cfg.num_paths // shards), cfg.chunk_size)

    _OUTPUTS = {"maps": 2, "delta": 1, "per_time": 1}

    def _finish(self, mode: str, delta, times, stats, banks, params, images_u8, class_ids):
        """delta [B,T,K,H,W] -> maps: (maps [B,H,W], scores [B]: the feature image scores
        with feature_knn > 0, else the map's image_score); delta: (delta,); per_time: (the
        smoothed path-aggregated maps [B,T,H,W],)."""
        cfg = self.config
        if mode == "delta":
            return (delta,)
        if mode == "per_time":
            return (per_time_maps(delta, cfg.aggregate, cfg.smooth_sigma),)
        feature_maps = None
        if cfg.feature_map:
            feature_maps = self._feature_maps(self.patch_fn(params, images_u8, class_ids), banks.patches)
        if cfg.map_rule == "learned":
            maps = learned.learned_map(per_time_maps(delta, cfg.aggregate, cfg.smooth_sigma), feature_maps, stats,
                                       banks.scale)
        else:
            maps = heat_maps(delta, times, cfg.aggregate, cfg.time_weight, cfg.smooth_sigma, cfg.normalize,
                             cfg.map_rule, stats)
            if cfg.feature_map:
                maps = feat.combine_maps(maps, feature_maps, banks.scale, cfg.feature_map)
        if cfg.feature_knn:
            return maps, feat.knn_scores(self.features_fn(params, images_u8, class_ids), banks.images,
                                         cfg.feature_knn)
        return maps, image_score(maps, cfg.image_score)

    def _grid(self, mode: str, num_images: int):
        """(jitted fn, sharded index) scoring `num_images` images in one call with their
        B*T*K network inputs split over the devices in equal runs of whole chunks."""
        key = (mode, num_images)
        if key not in self._grids:
            cfg, shards = self.config, self.mesh.devices.size
            index = grid_index(num_images, cfg.num_times, cfg.num_paths, self.chunk_for(num_images), shards)

            def local(params, images_u8, class_ids, noise, times, index):
                velocity = lambda x, t, y: self.apply_fn(params, x, t, y)
                return delta_chunks(velocity, to_model_range(images_u8), noise, times, index, class_ids)

            spread = jax.shard_map(local, mesh=self.mesh, in_specs=(P(),) * 5 + (P(DATA_AXIS),),
                                   out_specs=P(DATA_AXIS), check_vma=False)

            def full(params, images_u8, class_ids, noise, times, stats, banks, index):
                delta = grid_to_delta(spread(params, images_u8, class_ids, noise, times, index),
                                      num_images, cfg.num_times, cfg.num_paths)
                return self._finish(mode, delta, times, stats, banks, params, images_u8, class_ids)

            self._grids[key] = (xla_options.jit(full), jax.device_put(index, rows(self.mesh)))
        return self._grids[key]

    def _run(self, mode: str, params, images, class_ids, stats=None, banks=None):
        images, class_ids = check_images(images, class_ids, self.image_shape)
        self._build(params)
        stats = norm.neutral_stats(self.config.num_times) if stats is None else stats
        banks = feat.neutral_banks() if banks is None else banks
        if not 0 < len(images) < self.mesh.devices.size:
            return self._batches[mode](params, images, class_ids, self.noise, self.times, stats, banks)
        fn, index = self._grid(mode, len(images))
        params = jax.device_put(params, replicated(self.mesh))
        outs = fn(params, images, class_ids, self.noise, self.times, stats, banks, index)
        return tuple(np.asarray(out) for out in outs)

    def stats(self, fitted) -> norm.Stats | None:
        """The normalisation statistics the settings need, from the run's fitted arrays."""
        if self.config.normalize == "none":
            return None
        arrays = {} if fitted is None else fitted.arrays
        stats = norm.from_arrays(arrays, self.config.num_times, self.image_shape[:2])
        if self.config.map_rule == "learned" and not np.any(stats.readout):
            raise ScoreRuleError("score.map_rule=learned needs its weights fitted on held-out normal images, and the "
                                 "run has none: fit them with `fmjax calibrate --run RUN` or train again")
        return stats

    def banks(self, fitted) -> feat.Banks:
        """The training normals' features the settings need, from the run's fitted arrays
        (placeholders for what they do not use)."""
        cfg, arrays = self.config, {} if fitted is None else fitted.arrays
        neutral = feat.neutral_banks()
        return feat.Banks(feat.from_arrays(arrays) if cfg.feature_knn else neutral.images,
                          feat.from_arrays(arrays, feat.PATCH_PREFIX) if cfg.feature_map else neutral.patches,
                          feat.scale_from_arrays(arrays) if cfg.feature_map else neutral.scale)

    def score(self, params, images, class_ids=None, fitted=None):
        """images uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]) as numpy;
        `fitted` (the run's Fitted) holds the normalisation statistics when normalize is
        global or pixel, and the feature banks when feature_knn or feature_map > 0."""
        return self._run("maps", params, images, class_ids, self.stats(fitted), self.banks(fitted))

    def image_scores(self, params, images, class_ids=None, fitted=None):
        """images uint8 [N,H,W,C] -> the image scores float32 [N] of `score` as numpy,
        without the maps where the scores do not read them: with score.feature_knn > 0 one
        network call per image (the features against the bank) instead of K * T + 1."""
        if not self.config.feature_knn:
            return self.score(params, images, class_ids, fitted)[1]
        if self._knn_fn is None:
            self._knn_fn = jax.jit(functools.partial(feat.knn_scores, k=self.config.feature_knn))
        return np.asarray(self._knn_fn(self.features(params, images, class_ids), self.banks(fitted).images))

    def _feature_maps(self, patch_features, patches: feat.Bank):
        """The feature map F [B,H,W] of positions' features [B,h,w,D] against the bank
        `patches`, smoothed as the mismatch maps are."""
        return gaussian_smooth(feat.nearest_maps(patch_features, patches, self.image_shape[:2]),
                               self.config.smooth_sigma)

    def feature_maps(self, params, images, class_ids=None, patches: feat.Bank | None = None):
        """images uint8 [N,H,W,C] -> the feature maps F float32 [N,H,W] (smoothed by
        score.smooth_sigma) against the bank `patches`, before score.feature_map mixes them
        into the map (what fits the map's scale)."""
        positions = self.patch_features(params, images, class_ids)
        if self._feature_map_fn is None:
            self._feature_map_fn = jax.jit(self._feature_maps)
        return np.asarray(self._feature_map_fn(positions, patches))

    def features(self, params, images, class_ids=None):
        """images uint8 [N,H,W,C] -> the network's features float32 [N, D] as numpy
        (`image_bank.build_features_fn`), one network call per image."""
        return self._per_image("features_fn", params, images, class_ids)

    def patch_features(self, params, images, class_ids=None):
        """images uint8 [N,H,W,C] -> the network's features per position float32 [N, h, w, D]
        as numpy (`features.build_patch_features_fn`), one network call per image."""
        return self._per_image("patch_fn", params, images, class_ids)

    def _per_image(self, name: str, params, images, class_ids):
        fn = getattr(self, name)
        if fn is None:
            raise ScoreRuleError("this scorer was built without the network's features")
        if name not in self._feature_batches:
            self._feature_batches[name] = ImageBatches(lambda p, x, y: (fn(p, x, y),), self.image_shape,
                                                       _FEATURE_BATCH, 0, 1, self.devices)
        return self._feature_batches[name](params, images, class_ids)[0]

    def delta(self, params, images, class_ids=None):
        """images uint8 [N,H,W,C] -> raw mismatch float32 [N, T, K, H, W] as numpy."""
        return self._run("delta", params, images, class_ids)[0]

    def per_time(self, params, images, class_ids=None):
        """images uint8 [N,H,W,C] -> smoothed path-aggregated maps float32 [N, T, H, W]."""
        return self._run("per_time", params, images, class_ids)[0]
