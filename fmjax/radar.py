"""RADAR: single-step, reconstruction-free anomaly detection with a diffusion U-Net
(METHOD.md section 2).

Training: an epsilon-predicting DDPM U-Net on random patches of normal images.
Scoring an image: cut it into overlapping patches, noise every patch once to timestep
t_score with fixed noise, ONE network call on all patches, per-pixel noise map
(eps_hat - eps, or eps_hat), patches stitched back to an image map, Sobel gradient
magnitude of that map = the pixel-level localisation. Two image features: the L2 norm of
the whole Sobel map (global) and the largest patch-wise L2 norm (local). An Isolation
Forest fitted on the features of normal training images labels test images.

Everything the paper leaves open is a `RadarConfig` field.
"""
from __future__ import annotations

import math
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fmjax import train as fm_train, xla_options
from fmjax.config import (  # RadarConfig is re-exported here
    Config,
    ConfigError,
    RadarConfig,
)
from fmjax.flow import to_model_range
from fmjax.mismatch import gaussian_smooth
from fmjax.nets import unet
from fmjax.sharded import ImageBatches

SCHEDULES = ("linear", "cosine")
MAP_KINDS = ("eps_diff", "eps_hat")
CHANNEL_REDUCTIONS = ("l2", "mean_abs")
LOCAL_FEATURES = ("max_patch_l2",)


def validate_radar_config(rc: RadarConfig, image_shape=None, net=None) -> None:
    """Raises ConfigError (a ValueError, one-line message) for settings that cannot work.

    image_shape (H, W[, C]) adds the patch-vs-image checks; net (NetConfig) adds the
    U-Net divisibility check for the patch side.
    """
    if rc.schedule not in SCHEDULES:
        raise ConfigError(f"radar.schedule must be one of {', '.join(SCHEDULES)}, got {rc.schedule!r}")
    if rc.num_steps < 2:
        raise ConfigError(f"radar.num_steps must be >= 2, got {rc.num_steps}")
    if rc.schedule == "linear" and not 0.0 < rc.beta_start <= rc.beta_end < 1.0:
        raise ConfigError(f"radar.beta_start/beta_end must satisfy 0 < start <= end < 1, "
                          f"got {rc.beta_start}, {rc.beta_end}")
    if not 0 <= rc.t_score < rc.num_steps:
        raise ConfigError(f"radar.t_score must be in 0..{rc.num_steps - 1}, got {rc.t_score}")
    if rc.map_kind not in MAP_KINDS:
        raise ConfigError(f"radar.map_kind must be one of {', '.join(MAP_KINDS)}, got {rc.map_kind!r}")
    if rc.channel_reduce not in CHANNEL_REDUCTIONS:
        raise ConfigError(f"radar.channel_reduce must be one of {', '.join(CHANNEL_REDUCTIONS)}, "
                          f"got {rc.channel_reduce!r}")
    if rc.feature_local not in LOCAL_FEATURES:
        raise ConfigError(f"radar.feature_local must be one of {', '.join(LOCAL_FEATURES)}, "
                          f"got {rc.feature_local!r}")
    _check_patch(rc.patch_size, rc.patch_stride, image_shape)
    if isinstance(rc.contamination, str):
        if rc.contamination != "auto":
            raise ConfigError(f"radar.contamination must be a number in (0, 0.5] or 'auto', "
                              f"got {rc.contamination!r}")
    elif not 0.0 < rc.contamination <= 0.5:
        raise ConfigError(f"radar.contamination must be in (0, 0.5] or 'auto', got {rc.contamination}")
    if rc.n_estimators < 1 or rc.max_samples < 0:
        raise ConfigError("radar.n_estimators must be >= 1 and radar.max_samples >= 0")
    if rc.image_batch < 1:
        raise ConfigError(f"radar.image_batch must be >= 1, got {rc.image_batch}")
    if rc.sobel_smooth_sigma < 0:
        raise ConfigError(f"radar.sobel_smooth_sigma must be >= 0, got {rc.sobel_smooth_sigma}")
    if net is not None:
        factor = 2 ** (len(net.channel_mult) - 1)
        if rc.patch_size % factor:
            raise ConfigError(f"radar.patch_size {rc.patch_size} must be divisible by {factor} "
                              f"for net.channel_mult {net.channel_mult}")


def _check_patch(patch: int, stride: int, image_shape=None) -> None:
    if patch < 1:
        raise ConfigError(f"patch size must be >= 1, got {patch}")
    if stride < 1:
        raise ConfigError(f"patch stride must be >= 1, got {stride}")
    if stride > patch:
        raise ConfigError(f"patch stride {stride} exceeds patch size {patch}: pixels between patches would be missed")
    if image_shape is not None and (patch > image_shape[0] or patch > image_shape[1]):
        raise ConfigError(f"patch size {patch} is larger than the image {image_shape[0]}x{image_shape[1]}")


# ----------------------------------------------------------------------------- DDPM schedule

def ddpm_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> np.ndarray:
    """betas float64 [num_steps].

    linear: evenly spaced from beta_start to beta_end (Ho et al.).
    cosine: Nichol & Dhariwal, alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) normalised
    to alpha_bar(0) = 1, beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999).
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "cosine":
        f = lambda t: np.cos((t / num_steps + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
        steps = np.arange(num_steps + 1, dtype=np.float64)
        return np.minimum(1.0 - f(steps[1:]) / f(steps[:-1]), 0.999)
    raise ConfigError(f"unknown noise schedule {kind!r} (known: {', '.join(SCHEDULES)})")


def ddpm_schedule(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """alpha_bar float64 [num_steps]: alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1."""
    return np.cumprod(1.0 - ddpm_betas(kind, num_steps, beta_start, beta_end))


def schedule_of(rc: RadarConfig) -> np.ndarray:
    return ddpm_schedule(rc.schedule, rc.num_steps, rc.beta_start, rc.beta_end)


def q_sample(x0, eps, alpha_bar_t):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.  x0, eps: [N,H,W,C]; alpha_bar_t: [N] or scalar."""
    ab = jnp.asarray(alpha_bar_t, jnp.float32)
    ab = jnp.reshape(ab, ab.shape + (1,) * (x0.ndim - ab.ndim))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


# ----------------------------------------------------------------------------- training

def eps_loss(apply_fn, params, x0, key, alpha_bar, dropout_key):
    """DDPM epsilon-prediction loss, a scalar.

    apply_fn(params, x_t [N,H,W,C], t [N] in [0, 1), dropout_key) -> eps_hat [N,H,W,C].
    x0: [N,H,W,C] in [-1, 1]; alpha_bar: [num_steps].  t ~ U{0..num_steps-1}; the
    network gets t / num_steps (the U-Net scales by 1000, so with 1000 steps its
    sinusoid sees the integer timestep exactly).
    """
    num_steps = alpha_bar.shape[0]
    key_t, key_eps = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, num_steps)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    x_t = q_sample(x0, eps, jnp.asarray(alpha_bar, jnp.float32)[t])
    eps_hat = apply_fn(params, x_t, t.astype(jnp.float32) / num_steps, dropout_key)
    return jnp.mean(jnp.square(eps_hat.astype(jnp.float32) - eps))


def random_patches(images, key, patch: int, hflip: bool = False, vflip: bool = False):
    """One random patch x patch crop per image (plus optional random flips).

    images [N,H,W,C] -> [N,patch,patch,C]."""
    kh, kv, kc = jax.random.split(key, 3)
    n, h, w, c = images.shape
    if hflip:
        images = jnp.where(jax.random.bernoulli(kh, 0.5, (n, 1, 1, 1)), images[:, :, ::-1], images)
    if vflip:
        images = jnp.where(jax.random.bernoulli(kv, 0.5, (n, 1, 1, 1)), images[:, ::-1], images)
    corners = jax.random.randint(kc, (n, 2), 0, jnp.array([h - patch + 1, w - patch + 1]))
    crop = lambda img, yx: jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (patch, patch, c))
    return jax.vmap(crop)(images, corners)


def radar_train_step(state: fm_train.TrainState, images_u8, key, *, module, config: Config,
                     radar_config: RadarConfig):
    """One optimizer step of the epsilon objective on random patches. Pure.

    images_u8: uint8 [B,H,W,C]; key: the run key (folded with the step inside).
    Same optimizer and EMA rule as fmjax.train.train_step. Returns (state, metrics).
    """
    cfg = config.train
    tx = fm_train.make_optimizer(cfg)
    alpha_bar = jnp.asarray(schedule_of(radar_config), jnp.float32)
    step_key = jax.random.fold_in(key, state.step)
    key_crop, key_loss, key_drop = jax.random.split(step_key, 3)
    x0 = random_patches(to_model_range(images_u8), key_crop, radar_config.patch_size, cfg.hflip, cfg.vflip)

    def apply_fn(params, x, t, dropout_key):
        return module.apply(params, x, t, None, train=True, rngs={"dropout": dropout_key})

    loss, grads = jax.value_and_grad(lambda p: eps_loss(apply_fn, p, x0, key_loss, alpha_bar, key_drop))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up: early steps average over fewer steps (as fmjax.train)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return fm_train.TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def train_radar(config: Config, radar_config: RadarConfig, images: np.ndarray, steps: int | None = None,
                key=None, devices=None, progress: bool = False, run_dir: str | None = None, resume: bool = False):
    """Trains the epsilon network on normal images uint8 [N,H,W,C].

    steps: default config.train.steps; key: default PRNGKey(config.train.seed).
    devices: None = the first local device; a list spreads each batch over a `data` mesh
    (config.train.batch_size must divide evenly).  Parameters are initialised at the
    patch shape; the U-Net is fully convolutional so they apply to any patch count.
    run_dir: also keep a run folder in fmjax.train's layout: RUN/config.json (`config`),
    RUN/train_log.jsonl (step, loss, grad_norm, images_per_s) and orbax TrainState
    checkpoints under RUN/checkpoints (every train.checkpoint_every steps and at the end;
    fmjax.train.restore_state reads them).  resume: continue from the latest checkpoint
    there; batches and keys depend on the step only, so it repeats an uninterrupted run.
    Returns (state, losses float32 [steps run by this call]).
    """
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ConfigError(f"training images must be a non-empty [N, H, W, C] array, got shape {list(images.shape)}")
    validate_radar_config(radar_config, images.shape[1:], config.net)
    cfg = config.train
    steps = cfg.steps if steps is None else steps
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    mesh = fm_train.data_mesh(devices if devices is not None else jax.local_devices()[:1])
    if cfg.batch_size % mesh.devices.size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {mesh.devices.size} devices")
    init_key, run_key = jax.random.split(key)
    patch_shape = (radar_config.patch_size, radar_config.patch_size, images.shape[-1])
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state, manager, log_path = None, None, None
    if run_dir is not None:
        state, manager = _open_run(config, run_dir, patch_shape, resume)
        log_path = os.path.join(run_dir, "train_log.jsonl")
    if state is None:
        state = fm_train.init_state(config, patch_shape, init_key)
    state = jax.device_put(state, replicated)
    run_key = jax.device_put(run_key, replicated)
    module = unet.UNet(config.net, out_channels=images.shape[-1])
    step_fn = xla_options.jit(lambda s, x, k: radar_train_step(s, x, k, module=module, config=config,
                                                               radar_config=radar_config),
                              in_shardings=(replicated, batch_sharding, replicated),
                              out_shardings=(replicated, replicated), donate_argnums=0)
    first = int(state.step)
    if log_path and first == 0 and os.path.exists(log_path):
        os.remove(log_path)
    bar = fm_train._progress(first, steps, progress)
    losses, window, window_start = [], [], time.perf_counter()
    for step in range(first, steps):
        idx = fm_train.batch_indices(step, len(images), cfg.batch_size, cfg.seed)
        state, metrics = step_fn(state, jax.device_put(images[idx], batch_sharding), run_key)
        losses.append(metrics["loss"])
        window.append(metrics)
        done = step + 1
        checkpoint = manager is not None and (done % cfg.checkpoint_every == 0 or done == steps)
        # a checkpoint step also logs, so a NaN state is caught before it is saved
        if done % cfg.log_every == 0 or checkpoint or done == steps:
            values = jax.device_get(window)
            fm_train.log_window(values, done, cfg.batch_size, time.perf_counter() - window_start, log_path, bar,
                                what="radar loss")
            window, window_start = [], time.perf_counter()
        if checkpoint:
            manager.save(done, args=ocp.args.StandardSave(fm_train._state_dict(state)))
            window_start = time.perf_counter()  # checkpoint time is not training throughput
    if manager is not None:
        manager.wait_until_finished()
    bar.close()
    return state, np.asarray(jax.device_get(losses), np.float32)


def _open_run(config: Config, run_dir: str, patch_shape, resume: bool):
    """(restored state or None, checkpoint manager); writes RUN/config.json for a new run.
    The same rules as fmjax.train.train: existing checkpoints need resume and the same config."""
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    manager = fm_train.checkpoint_manager(run_dir, config)
    if manager.latest_step() is None:
        fm_train.write_json_atomic(config_path, config.to_json())
        return None, manager
    if not resume:
        raise fm_train.TrainError(f"{run_dir} already holds checkpoints: pass --resume to continue or choose a new --out")
    if not os.path.exists(config_path) or Config.from_json(open(config_path).read()) != config:
        raise fm_train.TrainError(f"--resume: {config_path} differs from this run's config; "
                                  f"resume with the same preset and --set overrides, or use a new --out")
    return fm_train.restore_state(run_dir, config, patch_shape), manager


# ----------------------------------------------------------------------------- patches

def patch_origins_1d(size: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets 0, stride, 2*stride, ...; a last start of size - patch is added when
    the strides stop short of the border, so every pixel is covered."""
    _check_patch(patch, stride, (size, size))
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return np.asarray(starts, np.int64)


def patch_origins(height: int, width: int, patch: int, stride: int) -> np.ndarray:
    """Top-left corners int64 [P, 2] (row-major over the grid of row and column starts)."""
    _check_patch(patch, stride, (height, width))
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


# ----------------------------------------------------------------------------- maps and features

def reduce_channels(d, how: str):
    """[..., C] -> [...]: 'l2' = sqrt(sum_c d^2), 'mean_abs' = mean_c |d|."""
    if how == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))
    if how == "mean_abs":
        return jnp.mean(jnp.abs(d), axis=-1)
    raise ConfigError(f"unknown channel reduction {how!r} (known: {', '.join(CHANNEL_REDUCTIONS)})")


def sobel_xy(maps):
    """Sobel derivatives of maps [B,H,W] -> (d/drow, d/dcol), each [B,H,W].

    3x3 Sobel kernels: derivative taps [-1, 0, 1] along the axis, smoothing [1, 2, 1]
    across it; borders reflect with the edge pixel repeated (scipy.ndimage 'reflect',
    d c b a | a b c d | d c b a).  Each equals scipy.ndimage.sobel(map, axis, mode='reflect').
    """
    m = jnp.pad(jnp.asarray(maps, jnp.float32), ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    h, w = m.shape[1] - 2, m.shape[2] - 2
    s = lambda dy, dx: m[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    d_row = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    d_col = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    return d_row, d_col


def sobel(maps):
    """Sobel gradient magnitude sqrt(gx^2 + gy^2), maps [B,H,W] -> [B,H,W] float32."""
    d_row, d_col = sobel_xy(maps)
    return jnp.sqrt(jnp.square(d_row) + jnp.square(d_col))


def features(sobel_maps, patch: int, stride: int, local: str = "max_patch_l2"):
    """The two RADAR image features, [B,H,W] -> float32 [B, 2].

    [:, 0] global: L2 norm of the whole Sobel map; [:, 1] local: the largest L2 norm
    over the scoring patches (same patch/stride grid as scoring).
    """
    if local not in LOCAL_FEATURES:
        raise ConfigError(f"unknown local feature {local!r} (known: {', '.join(LOCAL_FEATURES)})")
    s = jnp.asarray(sobel_maps, jnp.float32)
    global_l2 = jnp.sqrt(jnp.sum(jnp.square(s), axis=(1, 2)))
    patches, _ = extract_patches(s[..., None], patch, stride)  # [B,P,p,p,1]
    local_l2 = jnp.max(jnp.sqrt(jnp.sum(jnp.square(patches), axis=(2, 3, 4))), axis=1)
    return jnp.stack([global_l2, local_l2], axis=-1)


def radar_noise(key, num_patches: int, patch: int, channels: int):
    """Fixed test-time noise, one independent draw per patch position: float32 [P,p,p,C].
    Shared by every image (common random numbers)."""
    return jax.random.normal(key, (num_patches, patch, patch, channels), jnp.float32)


def noise_maps(apply_fn, params, images, noise, rc: RadarConfig, labels=None):
    """Stitched per-pixel noise maps [B,H,W] of images [B,H,W,C] in [-1, 1].

    apply_fn(params, x [n,p,p,C], t [n] in [0,1), y [n] or None) -> eps_hat [n,p,p,C].
    All B*P patches go through ONE network call at timestep t_score.
    """
    b, h, w, c = images.shape
    patches, origins = extract_patches(images, rc.patch_size, rc.patch_stride)
    num_patches = len(origins)
    x0 = patches.reshape((b * num_patches,) + patches.shape[2:])
    eps = jnp.broadcast_to(noise[None], (b,) + noise.shape).reshape(x0.shape)
    ab = float(schedule_of(rc)[rc.t_score])
    x_t = q_sample(x0, eps, ab)
    t = jnp.full((x0.shape[0],), rc.t_score / rc.num_steps, jnp.float32)
    y = None if labels is None else jnp.repeat(labels, num_patches)
    eps_hat = apply_fn(params, x_t, t, y).astype(jnp.float32)
    d = eps_hat - eps if rc.map_kind == "eps_diff" else eps_hat
    per_patch = reduce_channels(d, rc.channel_reduce).reshape(b, num_patches, rc.patch_size, rc.patch_size)
    return stitch(per_patch, origins, h, w)


def radar_maps(apply_fn, params, images, noise, rc: RadarConfig, labels=None):
    """images [B,H,W,C] in [-1, 1] -> (Sobel maps [B,H,W], features [B,2])."""
    m = gaussian_smooth(noise_maps(apply_fn, params, images, noise, rc, labels), rc.sobel_smooth_sigma)
    s = sobel(m)
    return s, features(s, rc.patch_size, rc.patch_stride, rc.feature_local)


class RadarScorer:
    """The jitted RADAR scoring path (mirrors fmjax.mismatch.Scorer).

    apply_fn(params, x [n,p,p,C], t [n], y [n] or None) -> eps_hat [n,p,p,C]
    (fmjax.train.build_model's apply_fn).  Images are spread over `devices` (default:
    all local devices), `image_batch` per device per call, padded, so every call has
    the same shapes and nothing recompiles.
    """

    def __init__(self, apply_fn, radar_config: RadarConfig, image_shape, devices=None):
        self.config = radar_config
        self.image_shape = tuple(int(s) for s in image_shape)
        validate_radar_config(radar_config, self.image_shape)
        self.origins = patch_origins(self.image_shape[0], self.image_shape[1], radar_config.patch_size,
                                     radar_config.patch_stride)
        self.noise = radar_noise(jax.random.PRNGKey(radar_config.noise_seed), len(self.origins),
                                 radar_config.patch_size, self.image_shape[2])
        def local(params, images_u8, labels, noise):
            return radar_maps(apply_fn, params, to_model_range(images_u8), noise, radar_config, labels)

        self._batches = ImageBatches(local, self.image_shape, radar_config.image_batch, 1, 2, devices)
        self.mesh = self._batches.mesh
        self._fn = self._batches.fn

    def score(self, params, images, labels=None):
        """images uint8 [N,H,W,C] -> (Sobel maps float32 [N,H,W], features float32 [N,2]) as numpy."""
        return self._batches(params, images, labels, self.noise)


def network_calls_per_image(rc: RadarConfig, image_shape) -> int:
    """Network evaluations per image: one per patch, all in one batched call (no
    sequential dependence), so latency is one forward pass of P patches."""
    return len(patch_origins(image_shape[0], image_shape[1], rc.patch_size, rc.patch_stride))


# ----------------------------------------------------------------------------- Isolation Forest

def fit_forest(features_normal, radar_config: RadarConfig):
    """Fits sklearn's IsolationForest on features [N, 2] of NORMAL training images only
    (test images and their labels never reach the fit).  Deterministic: random_state =
    radar_config.forest_seed."""
    from sklearn.ensemble import IsolationForest

    x = np.asarray(features_normal, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ConfigError(f"fit_forest needs features [N >= 2, D], got shape {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("fit_forest: features contain NaN or inf")
    forest = IsolationForest(n_estimators=radar_config.n_estimators, contamination=radar_config.contamination,
                             max_samples=radar_config.max_samples or "auto", random_state=radar_config.forest_seed)
    return forest.fit(x)


def forest_predict(forest, feats):
    """(labels int32 [N]: 1 = anomalous (forest.predict == -1), scores float32 [N] =
    -decision_function, higher = more anomalous; label 1 exactly where score > 0)."""
    x = np.asarray(feats, np.float64)
    labels = (forest.predict(x) == -1).astype(np.int32)
    return labels, (-forest.decision_function(x)).astype(np.float32)


def forest_to_bytes(forest) -> bytes:
    """Serialises the fitted forest with pickle (how scikit-learn persists estimators;
    loading needs a compatible scikit-learn version)."""
    return pickle.dumps(forest, protocol=pickle.HIGHEST_PROTOCOL)


def forest_from_bytes(data: bytes):
    """Inverse of forest_to_bytes.  pickle executes code while loading: load only
    checkpoints this project wrote."""
    from sklearn.ensemble import IsolationForest

    forest = pickle.loads(data)
    if not isinstance(forest, IsolationForest):
        raise ConfigError(f"stored forest is a {type(forest).__name__}, not an IsolationForest")
    return forest


def save_forest(path: str, forest) -> None:
    """Writes forest_to_bytes(forest) to `path` atomically (temp file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(forest_to_bytes(forest))
    os.replace(tmp, path)


def load_forest(path: str):
    """Reads a forest written by save_forest."""
    with open(path, "rb") as f:
        return forest_from_bytes(f.read())


# ----------------------------------------------------------------------------- metrics

def radar_metrics(labels, predicted_labels) -> dict:
    """Accuracy, precision, recall and F1 of 0/1 predictions (1 = anomalous).
    Precision (recall) is 0 when nothing is predicted (present) anomalous."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(predicted_labels).astype(bool).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.size} vs {p.size}")
    tp, fp, fn = int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # 2PR / (P + R) from the counts: thresholded_metrics' F1 exactly
    accuracy = float(np.mean(y == p)) if y.size else math.nan
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}
