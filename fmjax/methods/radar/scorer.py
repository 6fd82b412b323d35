"""RADAR's scoring path (docs/method.md, section 2): cut an image into overlapping
patches, noise every patch once to timestep t_score with fixed noise, ONE network call
on all patches, a per-pixel noise map (eps_hat - eps, or eps_hat) stitched back to an
image map (with score.normalize = pixel standardised per pixel, `standardize`), and its
Sobel gradient magnitude as the pixel-level localisation. Two image
features (the L2 norm of the whole Sobel map, the largest patch-wise L2 norm) go to the
Isolation Forest fitted on held-out normal images (`forest`, `method.Radar.fit`), whose
score is the image score. With score.feature_knn = k > 0 the forest reads one more feature:
the distance of the network's own features of the clean image to the k nearest training
normals' (`fmjax.methods.image_bank`, read at t = 0)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError, ScoreRuleError
from fmjax.flow import to_model_range
from fmjax.methods import image_bank
from fmjax.methods.base import ScoringProgram
from fmjax.methods.batches import ImageBatches
from fmjax.methods.maps import gaussian_smooth
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar import standardize
from fmjax.methods.radar.ddpm import q_sample, schedule_of
from fmjax.methods.radar.patches import extract_patches, patch_origins, stitch
from fmjax.methods.radar.settings import (AUTO, CHANNEL_REDUCTIONS, CHOICES, LOCAL_FEATURES, RadarSettings,
                                          validate_settings)

__all__ = ["RadarScorer", "features", "noise_maps", "radar_maps", "radar_noise", "reduce_channels",
           "smoothed_noise_maps", "sobel", "sobel_and_features", "sobel_xy", "timestep"]


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


def timestep(rc: RadarSettings, t_score: int | None = None) -> tuple[np.float32, np.float32]:
    """(alpha_bar, the network's time t_score / num_steps) of timestep `t_score` (default
    score.t_score), as the float32 scalars `noise_maps` reads."""
    t_score = rc.t_score if t_score is None else int(t_score)
    return np.float32(schedule_of(rc)[t_score]), np.float32(t_score / rc.num_steps)


def noise_maps(apply_fn, params, images, noise, rc: RadarSettings, class_ids=None, at=None):
    """Stitched per-pixel noise maps [B,H,W] of images [B,H,W,C] in [-1, 1].

    apply_fn(params, x [n,p,p,C], t [n] in [0,1), y [n] or None) -> eps_hat [n,p,p,C].
    All B*P patches go through ONE network call at timestep t_score, or at `at` =
    (alpha_bar, t) (`timestep`; arguments of a jitted caller, so one program serves every
    timestep).
    """
    b, h, w, c = images.shape
    patches, origins = extract_patches(images, rc.patch_size, rc.patch_stride)
    num_patches = len(origins)
    x0 = patches.reshape((b * num_patches,) + patches.shape[2:])
    eps = jnp.broadcast_to(noise[None], (b,) + noise.shape).reshape(x0.shape)
    ab, t_value = timestep(rc) if at is None else at
    x_t = q_sample(x0, eps, ab)
    t = jnp.full((x0.shape[0],), t_value, jnp.float32)
    y = None if class_ids is None else jnp.repeat(class_ids, num_patches)
    eps_hat = apply_fn(params, x_t, t, y).astype(jnp.float32)
    d = eps_hat - eps if rc.map_kind == "eps_diff" else eps_hat
    per_patch = reduce_channels(d, rc.channel_reduce).reshape(b, num_patches, rc.patch_size, rc.patch_size)
    return stitch(per_patch, origins, h, w)


def smoothed_noise_maps(apply_fn, params, images, noise, rc: RadarSettings, class_ids=None, at=None):
    """The noise maps [B,H,W] (`noise_maps`) blurred by score.sobel_smooth_sigma: what the Sobel filter reads."""
    return gaussian_smooth(noise_maps(apply_fn, params, images, noise, rc, class_ids, at), rc.sobel_smooth_sigma)


def radar_maps(apply_fn, params, images, noise, rc: RadarSettings, class_ids=None, pixel_mean=None, pixel_std=None):
    """images [B,H,W,C] in [-1, 1] -> (Sobel maps [B,H,W], features [B,F]): F = 2 (`features`)
    or, with score.map_feature, 3 (the third: the L2 norm of the noise map the Sobel filter
    read). pixel_mean, pixel_std [H,W]: the smoothed noise map is standardised by them before Sobel."""
    m = smoothed_noise_maps(apply_fn, params, images, noise, rc, class_ids)
    if pixel_mean is not None:
        m = (m - pixel_mean) / pixel_std
    return sobel_and_features(m, rc)


def sobel_and_features(m, rc: RadarSettings):
    """The (smoothed, standardised) noise maps [B,H,W] -> (their Sobel maps [B,H,W], the
    forest's features [B,F]): F = 2 (`features`) or, with score.map_feature, 3 (the third:
    the L2 norm of `m`)."""
    s = sobel(m)
    feats = features(s, rc.patch_size, rc.patch_stride, rc.feature_local)
    if rc.map_feature:
        feats = jnp.concatenate([feats, jnp.sqrt(jnp.sum(jnp.square(m), axis=(1, 2)))[:, None]], axis=-1)
    return s, feats


class RadarScorer:
    """The jitted RADAR scoring path.

    apply_fn(params, x [n,p,p,C], t [n], y [n] or None) -> eps_hat [n,p,p,C] (the U-Net in
    eval mode). Images are spread over `devices` (default: all local devices),
    `image_batch` per device per call, padded, so every call has the same shapes and
    nothing recompiles. features_fn(params, images_u8, class_ids) -> [n, D]
    (`image_bank.build_features_fn`): the network's features of the clean images, needed
    with score.feature_knn > 0.
    """

    def __init__(self, apply_fn, settings: RadarSettings, image_shape, devices=None, features_fn=None):
        self.config = settings
        self.image_shape = tuple(int(s) for s in image_shape)
        validate_settings(settings, self.image_shape)
        unresolved = [f"score.{name}" for name in CHOICES if getattr(settings, name) == AUTO]
        if unresolved:
            one = len(unresolved) == 1
            raise ConfigError(f"{' and '.join(unresolved)} {'is' if one else 'are'} {AUTO!r}: chosen when the run is "
                              f"fitted on its held-out normals (fmjax train, fmjax calibrate); a scorer needs "
                              f"{'it' if one else 'them'} set")
        if settings.feature_knn and features_fn is None:
            raise ScoreRuleError("score.feature_knn needs the network's features: build the scorer through its method")
        self.origins = patch_origins(self.image_shape[0], self.image_shape[1], settings.patch_size,
                                     settings.patch_stride)
        self.noise = radar_noise(jax.random.PRNGKey(settings.noise_seed), len(self.origins), settings.patch_size,
                                 self.image_shape[2])

        def local(params, images_u8, class_ids, noise, pixel_mean, pixel_std, *bank):
            maps, feats = radar_maps(apply_fn, params, to_model_range(images_u8), noise, settings, class_ids,
                                     pixel_mean, pixel_std)
            if settings.feature_knn:
                knn = image_bank.knn_scores(features_fn(params, images_u8, class_ids), image_bank.Bank(*bank),
                                            settings.feature_knn)
                feats = jnp.concatenate([feats, knn[:, None]], axis=-1)
            return maps, feats

        def local_noise(params, images_u8, class_ids, noise, alpha_bar, t):
            return (smoothed_noise_maps(apply_fn, params, to_model_range(images_u8), noise, settings, class_ids,
                                        (alpha_bar, t)),)

        self._local = local
        self._batches = ImageBatches(local, self.image_shape, settings.image_batch, 3 + len(image_bank.Bank._fields), 2,
                                     devices)
        self._noise_batches = ImageBatches(local_noise, self.image_shape, settings.image_batch, 3, 1, devices)
        self._feature_batches = None if features_fn is None else ImageBatches(
            lambda p, x, y: (features_fn(p, x, y),), self.image_shape, settings.image_batch, 0, 1, devices)
        self.mesh = self._batches.mesh

    def _bank(self, fitted) -> image_bank.Bank:
        """The fitted memory bank with score.feature_knn, else a placeholder the program ignores."""
        if not self.config.feature_knn:
            return image_bank.empty_bank()
        return image_bank.from_arrays({} if fitted is None else fitted.arrays)

    def _stats(self, fitted):
        stats = standardize.from_fitted(fitted, self.config.normalize, *self.image_shape[:2])
        return stats[standardize.MEAN], stats[standardize.STD]

    def program(self, params, fitted=None) -> ScoringProgram:
        """The per-device function `maps_and_features` runs on every device, for export;
        its outputs are the forest's features and the forest (float64, numpy) scores them
        outside the program."""
        forest_lib.from_fitted(fitted)  # a one-line error for a run without a sound forest
        local, (mean, std), bank = self._local, self._stats(fitted), self._bank(fitted)
        return ScoringProgram(fn=lambda params, consts, images_u8, class_ids: local(
            params, images_u8, class_ids, consts["noise"], consts["pixel_mean"], consts["pixel_std"],
            *(consts[f"bank_{name}"] for name in image_bank.Bank._fields)),
            consts={"noise": self.noise, "pixel_mean": mean, "pixel_std": std,
                    **{f"bank_{name}": value for name, value in bank._asdict().items()}},
            batch=self.config.image_batch, finish="isolation_forest", finish_fitted=fitted)

    def noise_maps(self, params, images, class_ids=None, t_score: int | None = None):
        """images uint8 [N,H,W,C] -> the smoothed noise maps float32 [N,H,W], before any
        standardisation (what `standardize.fit` reads), at timestep `t_score` (default
        score.t_score; every timestep runs the same compiled program)."""
        return self._noise_batches(params, images, class_ids, self.noise, *timestep(self.config, t_score))[0]

    def maps_and_features(self, params, images, class_ids=None, fitted=None):
        """images uint8 [N,H,W,C] -> (Sobel maps float32 [N,H,W], features float32 [N,F]): F
        as `radar_maps`, plus the memory bank distance with score.feature_knn; fitted: the
        run's Fitted, whose per-pixel statistics (score.normalize = pixel) and memory bank
        (score.feature_knn) it reads."""
        return self._batches(params, images, class_ids, self.noise, *self._stats(fitted), *self._bank(fitted))

    def features(self, params, images, class_ids=None):
        """images uint8 [N,H,W,C] -> the network's features of the clean images float32
        [N, D] (`image_bank.build_features_fn`), what the memory bank holds."""
        if self._feature_batches is None:
            raise ScoreRuleError("this scorer was built without the network's features")
        return self._feature_batches(params, images, class_ids)[0]

    def score(self, params, images, class_ids=None, fitted=None):
        """images uint8 [N,H,W,C] -> (Sobel maps float32 [N,H,W], scores float32 [N]): the
        score is -decision_function of the forest in `fitted` (higher = more anomalous;
        above 0 exactly where the forest labels the image anomalous)."""
        maps, feats = self.maps_and_features(params, images, class_ids, fitted)
        return maps, forest_lib.score(forest_lib.from_fitted(fitted), feats)
