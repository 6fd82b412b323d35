"""Flow Mismatching scorer (METHOD.md section 1).

For a test image y, K noise images eps_k and T interior times t_j = j / (T + 1):
  delta_{j,k}(p) = sum_c ( v(x, t_j) - (y - eps_k) )^2,   x = (1 - t_j) eps_k + t_j y,
  H(p) = (1/T) sum_j w(t_j) Agg_k delta_{j,k}(p),           image score = rule(H).
All B*T*K network calls of a batch of images run inside one jitted function, in chunks of
a fixed number of network inputs, so memory stays bounded and nothing recompiles.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax import xla_options
from fmjax.flow import path_point, target_velocity, to_model_range
from fmjax.sharded import ImageBatches, check_images


class ScoreRuleError(ValueError):
    """A scoring setting that cannot work: an unknown or out-of-range aggregation / weight /
    image-score rule, or a memory budget below one network call."""


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


def parse_aggregate(spec: str, num_paths: int):
    """'min' | 'rank:r' | 'quantile:a' | 'mean' | 'median' | 'trimmed:f' -> (kind, value).

    kind is 'rank' (value = 1-based order statistic r), 'mean', 'median' or 'trimmed'
    (value = number of paths cut from each end).
    """
    name, _, arg = spec.partition(":")
    try:
        if name == "min" and not arg:
            return "rank", 1
        if name == "rank":
            r = int(arg)
            if not 1 <= r <= num_paths:
                raise ScoreRuleError(f"aggregate {spec!r}: r must be in 1..K={num_paths}")
            return "rank", r
        if name == "quantile":
            alpha = float(arg)
            if not 0.0 < alpha <= 1.0:
                raise ScoreRuleError(f"aggregate {spec!r}: alpha must be in (0, 1]")
            return "rank", max(1, math.ceil(alpha * num_paths - 1e-9))
        if name in ("mean", "median") and not arg:
            return name, 0
        if name == "trimmed":
            frac = float(arg)
            if not 0.0 <= frac < 0.5:
                raise ScoreRuleError(f"aggregate {spec!r}: fraction must be in [0, 0.5)")
            return "trimmed", int(math.floor(frac * num_paths))
    except ValueError as err:
        if isinstance(err, ScoreRuleError):
            raise
        raise ScoreRuleError(f"aggregate {spec!r}: bad number {arg!r}") from None
    raise ScoreRuleError(f"unknown aggregate {spec!r} (known: min, rank:r, quantile:a, mean, median, trimmed:f)")


def aggregate_paths(delta, spec: str, axis: int = -3):
    """Reduces the path axis of `delta` (default [..., K, H, W]) with rule `spec`."""
    num_paths = delta.shape[axis]
    kind, value = parse_aggregate(spec, num_paths)
    if kind == "mean":
        return jnp.mean(delta, axis=axis)
    ordered = jnp.sort(delta, axis=axis)
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
    if rule == "none":
        return jnp.ones_like(times)
    raise ScoreRuleError(f"unknown time weight {rule!r} (known: t2, none)")


def aggregate_times(per_time, times, rule: str):
    """(1/T) sum_j w(t_j) A_j.  per_time [..., T, H, W] -> [..., H, W]."""
    w = time_weights(times, rule)
    return jnp.einsum("...thw,t->...hw", per_time, w) / w.shape[0]


def parse_image_score(spec: str):
    """'max_plus_top1' | 'max' | 'topk_mean:f' -> (kind, fraction)."""
    name, _, arg = spec.partition(":")
    if name in ("max_plus_top1", "max") and not arg:
        return name, 0.01
    if name == "topk_mean":
        try:
            frac = float(arg)
        except ValueError:
            raise ScoreRuleError(f"image score {spec!r}: bad fraction {arg!r}") from None
        if not 0.0 < frac <= 1.0:
            raise ScoreRuleError(f"image score {spec!r}: fraction must be in (0, 1]")
        return name, frac
    raise ScoreRuleError(f"unknown image score {spec!r} (known: max_plus_top1, max, topk_mean:f)")


def _top_mean(flat, fraction):
    k = max(1, math.ceil(fraction * flat.shape[-1] - 1e-9))
    return jnp.mean(jax.lax.top_k(flat, k)[0], axis=-1)


def image_score(maps, spec: str):
    """Image scores [B] from maps [B, H, W].

    max_plus_top1: max(H) + mean of the top 1% of pixels (at least one pixel);
    max: max(H); topk_mean:f: mean of the top ceil(f * H * W) pixels.
    """
    kind, frac = parse_image_score(spec)
    flat = maps.reshape(maps.shape[0], -1)
    if kind == "max":
        return jnp.max(flat, axis=-1)
    if kind == "max_plus_top1":
        return jnp.max(flat, axis=-1) + _top_mean(flat, frac)
    return _top_mean(flat, frac)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D normalised Gaussian taps, radius int(truncate * sigma + 0.5) (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_smooth(maps, sigma: float):
    """Separable Gaussian blur of maps [B, H, W]; mirror borders as scipy's 'reflect'."""
    if sigma <= 0:
        return maps
    taps = jnp.asarray(gaussian_kernel(sigma))
    radius = (taps.shape[0] - 1) // 2

    def blur_axis(m, axis):
        n = m.shape[axis]
        # scipy's 'reflect' (d c b a | a b c d | d c b a), periodic for any radius
        idx = np.arange(-radius, n + radius) % (2 * n)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        m = jnp.take(m, jnp.asarray(idx), axis=axis)
        return sum(taps[i] * jax.lax.slice_in_dim(m, i, i + n, axis=axis) for i in range(taps.shape[0]))

    return blur_axis(blur_axis(maps, 1), 2)


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


def delta_chunks(velocity_fn, images, noise, times, index, labels=None):
    """Per-pixel mismatch of the network inputs named by `index` [n_chunks, chunk, 3]
    (from grid_index), one sequential network call per chunk -> float32 [n_chunks, chunk, H, W].

    velocity_fn(x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].
    images: float [B,H,W,C] in [-1, 1]; noise: [K,H,W,C]; times: [T]; labels: int [B] or None.
    """
    def one_item(y, eps, t):
        return path_point(eps[None], y[None], t[None])[0], target_velocity(eps, y)

    def chunk(idx):
        y = images[idx[:, 0]]
        eps = noise[idx[:, 2]]
        t = times[idx[:, 1]]
        x, u = jax.vmap(one_item)(y, eps, t)
        v = velocity_fn(x, t, None if labels is None else labels[idx[:, 0]])
        return jnp.sum(jnp.square(v.astype(jnp.float32) - u), axis=-1)

    return jax.lax.map(chunk, jnp.asarray(index))


def grid_to_delta(chunks, num_images: int, num_times: int, num_paths: int):
    """delta_chunks output [n_chunks, chunk, H, W] -> delta [B, T, K, H, W] (padding dropped)."""
    total = num_images * num_times * num_paths
    flat = chunks.reshape((-1,) + chunks.shape[2:])[:total]
    return flat.reshape((num_images, num_times, num_paths) + chunks.shape[2:])


def mismatch_delta(velocity_fn, images, noise, times, chunk_size: int, labels=None):
    """Per-pixel mismatch for every (image, time, path).

    velocity_fn(x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].
    images: float [B,H,W,C] in [-1, 1]; noise: [K,H,W,C]; times: [T]; labels: int [B] or None.
    Returns delta float32 [B, T, K, H, W].  The B*T*K network inputs are evaluated in
    ceil(B*T*K / chunk_size) sequential calls of exactly chunk_size inputs each.
    """
    num_images, num_paths, num_times = images.shape[0], noise.shape[0], times.shape[0]
    index = grid_index(num_images, num_times, num_paths, chunk_size)
    chunks = delta_chunks(velocity_fn, images, noise, times, index, labels)
    return grid_to_delta(chunks, num_images, num_times, num_paths)


def forward_bytes(apply_fn, params, image_shape, chunk: int) -> int:
    """Device bytes XLA reserves for one call of apply_fn on `chunk` inputs: temporaries
    plus output, from the compiled program's memory analysis (nothing runs)."""
    x = jax.ShapeDtypeStruct((chunk,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((chunk,), jnp.float32)
    y = jax.ShapeDtypeStruct((chunk,), jnp.int32)
    memory = xla_options.jit(apply_fn).lower(params, x, t, y).compile().memory_analysis()
    if memory is None:
        raise ScoreRuleError(f"the {jax.default_backend()} backend reports no memory analysis; set score.chunk_size")
    return int(memory.temp_size_in_bytes + memory.output_size_in_bytes)


def even_chunk(inputs: int, max_chunk: int) -> int:
    """The smallest chunk that covers `inputs` network inputs in as few calls as chunks of
    `max_chunk` do: padding then wastes less than one input per call (480 inputs at most
    236 per call: 3 calls of 160, not 3 of 236 with 228 padded)."""
    calls = -(-inputs // max_chunk)
    return -(-inputs // calls)


def chunk_size_for_budget(apply_fn, params, image_shape, budget_bytes: int, max_chunk: int,
                          fixed_bytes: int = 0, probe: int = 4, max_compiles: int = 8) -> int:
    """The largest chunk (network inputs per call, <= max_chunk) whose call fits in
    `budget_bytes` of one device beside the params and `fixed_bytes` (the stored mismatch).

    Every candidate is checked with its compiled memory analysis (`forward_bytes`), so the
    chunk returned fits. Candidates come from a line through the two largest chunks
    compiled so far (first 1 and `probe` inputs), kept between the largest chunk known to
    fit and the smallest known not to. Memory is close to affine in the chunk, but not at
    small chunks: the paper preset at 256x256 reserved 380 MB for 1 input, 495 MB for 4
    and 4,217 MB for 36, the chunk a line through 1 and 4 picks for the 1,755 MB of room
    the default budget leaves (this search picks 14: 1,732 MB). At most `max_compiles`
    programs are compiled; the search then returns the largest chunk known to fit.
    Raises ScoreRuleError when not even one input fits.
    """
    params_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    room = budget_bytes - params_bytes - fixed_bytes
    known = {1: forward_bytes(apply_fn, params, image_shape, 1)}
    if known[1] > room:
        need = (params_bytes + fixed_bytes + known[1]) / 2 ** 20
        raise ScoreRuleError(f"score.memory_budget_mb = {budget_bytes / 2 ** 20:.0f} is below one network call "
                             f"({need:.0f} MB with params and stored mismatch); raise it or set score.chunk_size")
    candidate = min(probe, max_chunk)
    while candidate not in known and len(known) < max_compiles:
        known[candidate] = forward_bytes(apply_fn, params, image_shape, candidate)
        fits = max(c for c, b in known.items() if b <= room)
        over = min((c for c, b in known.items() if b > room), default=max_chunk + 1)
        if fits == max_chunk or over == fits + 1:
            break
        (c1, b1), (c2, b2) = sorted(known.items())[-2:]
        per_input = max((b2 - b1) / (c2 - c1), 1.0)
        candidate = min(max(int(c2 + (room - b2) // per_input), fits + 1), over - 1)
    return max(c for c, b in known.items() if b <= room)


def heat_maps(delta, times, aggregate: str, time_weight: str, smooth_sigma: float = 0.0):
    """delta [B, T, K, H, W] -> maps H [B, H, W] (paths aggregated, times weighted, smoothed)."""
    per_time = aggregate_paths(delta, aggregate, axis=2)
    return gaussian_smooth(aggregate_times(per_time, times, time_weight), smooth_sigma)


# ----------------------------------------------------------------------------- scorer

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
    """

    def __init__(self, apply_fn, config, image_shape, devices=None):
        self.config = config
        self.image_shape = tuple(image_shape)
        self.apply_fn = apply_fn
        parse_aggregate(config.aggregate, config.num_paths)
        parse_image_score(config.image_score)
        time_weights(jnp.zeros(1), config.time_weight)
        self.noise = path_noise(jax.random.PRNGKey(config.seed), config.num_paths, self.image_shape)
        self.times = jnp.asarray(interior_times(config.num_times))
        self.devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._batches = None
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

        def local_delta(params, images_u8, labels, noise, times):
            velocity = lambda x, t, y: self.apply_fn(params, x, t, y)
            return (mismatch_delta(velocity, to_model_range(images_u8), noise, times, chunk, labels),)

        def local_maps(params, images_u8, labels, noise, times):
            return self._finish(local_delta(params, images_u8, labels, noise, times)[0], times)

        self._batches = {True: ImageBatches(local_maps, self.image_shape, cfg.image_batch, 2, 2, self.devices),
                         False: ImageBatches(local_delta, self.image_shape, cfg.image_batch, 2, 1, self.devices)}

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

    def _finish(self, delta, times):
        """delta [B,T,K,H,W] -> (maps [B,H,W], scores [B])."""
        cfg = self.config
        maps = heat_maps(delta, times, cfg.aggregate, cfg.time_weight, cfg.smooth_sigma)
        return maps, image_score(maps, cfg.image_score)

    def _grid(self, want_maps: bool, num_images: int):
        """(jitted fn, sharded index) scoring `num_images` images in one call with their
        B*T*K network inputs split over the devices in equal runs of whole chunks."""
        key = (want_maps, num_images)
        if key not in self._grids:
            cfg, shards = self.config, self.mesh.devices.size
            index = grid_index(num_images, cfg.num_times, cfg.num_paths, self.chunk_for(num_images), shards)

            def local(params, images_u8, labels, noise, times, index):
                velocity = lambda x, t, y: self.apply_fn(params, x, t, y)
                return delta_chunks(velocity, to_model_range(images_u8), noise, times, index, labels)

            spread = jax.shard_map(local, mesh=self.mesh, in_specs=(P(),) * 5 + (P("data"),),
                                   out_specs=P("data"), check_vma=False)

            def full(params, images_u8, labels, noise, times, index):
                delta = grid_to_delta(spread(params, images_u8, labels, noise, times, index),
                                      num_images, cfg.num_times, cfg.num_paths)
                return self._finish(delta, times) if want_maps else (delta,)

            self._grids[key] = (xla_options.jit(full), jax.device_put(index, NamedSharding(self.mesh, P("data"))))
        return self._grids[key]

    def _run(self, want_maps: bool, params, images, labels):
        images, labels = check_images(images, labels, self.image_shape)
        self._build(params)
        if not 0 < len(images) < self.mesh.devices.size:
            return self._batches[want_maps](params, images, labels, self.noise, self.times)
        fn, index = self._grid(want_maps, len(images))
        params = jax.device_put(params, NamedSharding(self.mesh, P()))
        outs = fn(params, images, labels, self.noise, self.times, index)
        return tuple(np.asarray(out) for out in outs)

    def score(self, params, images, labels=None):
        """images uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]) as numpy."""
        return self._run(True, params, images, labels)

    def delta(self, params, images, labels=None):
        """images uint8 [N,H,W,C] -> raw mismatch float32 [N, T, K, H, W] as numpy."""
        return self._run(False, params, images, labels)[0]
