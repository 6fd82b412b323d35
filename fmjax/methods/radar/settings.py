"""RADAR's settings, presets and checks (docs/method.md, section 2). Every field is a
choice the paper leaves open. Pure Python: the config imports this module without JAX."""
from __future__ import annotations

import dataclasses

from fmjax.ranges import IMAGE_BATCH, SEED, SIGMA, Range, check_ranges
from fmjax.errors import ConfigError

__all__ = ["AUTO", "CHOICES", "NEUTRAL", "PRESETS", "RANGES", "TRAINING", "WRITTEN_BEFORE", "RadarSettings",
           "Settings", "check_patch", "validate"]

SCHEDULES = ("linear", "cosine")
MAP_KINDS = ("eps_diff", "eps_hat")
CHANNEL_REDUCTIONS = ("l2", "mean_abs")
LOCAL_FEATURES = ("max_patch_l2",)
NORMALIZATIONS = ("none", "pixel")
AUTO = "auto"  # t_score, sobel_smooth_sigma: chosen on the run's held-out normals when it is fitted (choice.py)
CHOICES = {"t_score": (10, 25, 50, 100, 250, 500), "sobel_smooth_sigma": (0.0, 1.0, 2.0, 4.0, 8.0)}


@dataclasses.dataclass(frozen=True)
class RadarSettings:
    # the scoring defaults: one_sided and map_feature are the texture protocol's choice
    # (experiments/select_radar.py, results/selection/radar.md); t_score and the blur are
    # chosen per run from CHOICES (choice.py), which the same protocol preferred to any one value
    schedule: str = "linear"  # linear | cosine (Nichol & Dhariwal, s = 0.008)
    num_steps: int = 1000  # DDPM timesteps
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    t_score: int | str = AUTO  # the single noising timestep used at test time, in 0..num_steps-1 (the paper: 250)
    map_kind: str = "eps_diff"  # eps_diff: eps_hat - eps | eps_hat: the prediction alone
    channel_reduce: str = "l2"  # l2: sqrt(sum_c d^2) | mean_abs: mean_c |d|
    patch_size: int = 32  # training crops and scoring patches (square)
    patch_stride: int = 16  # scoring patch stride; the last row/column is shifted to the border
    feature_local: str = "max_patch_l2"  # local feature: max over patches of the patch L2 norm
    # Isolation Forest. contamination: fraction of the (normal) training features the forest
    # places beyond its threshold, so 0.05 puts the threshold at the 5% least typical
    # training normal; "auto" uses the original Isolation Forest offset (score 0.5).
    contamination: float | str = 0.05
    # True (fmjax's addition): features below the held-out normals' median are raised to it
    # before the forest (forest.fit), so only more noise error than usual is anomalous
    one_sided: bool = True
    # True (fmjax's addition): a third feature, the L2 norm of the (standardised) noise map
    # itself: how much error, beside where it has edges (scorer.radar_maps)
    map_feature: bool = True
    # k > 0 (fmjax's addition): one more feature, the distance of the network's own features
    # of the clean image to the k nearest of at most feature_bank training normals' in a
    # memory bank (fmjax/methods/image_bank.py)
    feature_knn: int = 0
    feature_bank: int = 4096
    n_estimators: int = 200
    max_samples: int = 0  # trees' subsample size; 0: sklearn's "auto" (min(256, N))
    forest_seed: int = 0
    noise_seed: int = 0  # fixed test-time noise: an image's score never depends on its batch
    sobel_smooth_sigma: float | str = AUTO  # Gaussian blur (pixels) of the noise map before Sobel; 0 = off (the paper)
    # none (the paper) | pixel: the blurred noise map standardised per pixel by held-out
    # normals' mean and std before Sobel (standardize.py; aligned images)
    normalize: str = "none"
    image_batch: int = 4  # images per device per jitted scoring call (padded: no recompiles)
    use_ema: bool = True


Settings = RadarSettings

PRESETS = {"tiny": Settings(t_score=500, sobel_smooth_sigma=4.0, patch_size=8, patch_stride=4, n_estimators=50,
                           image_batch=2),
           # one-class sets, where the anomaly is a whole object of another kind: the noise map
           # standardised per pixel (standardize.py), its norm a third feature, a one-sided forest, and
           # the memory bank's distance a fourth; chosen by experiments/select_radar.py --aligned
           # (results/selection/radar_aligned.md, then radar_aligned_knn/radar_aligned.md)
           "aligned": Settings(t_score=500, sobel_smooth_sigma=0.0, normalize="pixel", one_sided=True,
                               map_feature=True, feature_knn=5)}
# a run's config.json written before these settings existed scored without them
WRITTEN_BEFORE = {"one_sided": False, "map_feature": False}
NEUTRAL = ("image_batch",)  # changes neither the features nor the forest
TRAINING = ("schedule", "num_steps", "beta_start", "beta_end")  # the trained network's noise schedule
RANGES = {"num_steps": Range(2, 100_000), "beta_start": Range(0.0, 1.0, low_open=True, high_open=True),
          "beta_end": Range(0.0, 1.0, low_open=True, high_open=True), "t_score": Range(0, 99_999),
          "patch_size": Range(1, 16384), "patch_stride": Range(1, 16384),
          "contamination": Range(0.0, 0.5, low_open=True),  # or "auto"
          "n_estimators": Range(1, 100_000), "max_samples": Range(0, 1 << 31), "forest_seed": SEED,
          "noise_seed": SEED, "sobel_smooth_sigma": SIGMA, "image_batch": IMAGE_BATCH,
          "feature_knn": Range(0, 1 << 16), "feature_bank": Range(1, 1 << 20)}


def check_patch(patch: int, stride: int, image_shape=None) -> None:
    """ConfigError unless square patches of side `patch` at `stride` tile an image of
    `image_shape` (H, W[, C]) without gaps."""
    if patch < 1:
        raise ConfigError(f"patch size must be >= 1, got {patch}")
    if stride < 1:
        raise ConfigError(f"patch stride must be >= 1, got {stride}")
    if stride > patch:
        raise ConfigError(f"patch stride {stride} exceeds patch size {patch}: pixels between patches would be missed")
    if image_shape is not None and (patch > image_shape[0] or patch > image_shape[1]):
        raise ConfigError(f"patch size {patch} is larger than the image {image_shape[0]}x{image_shape[1]}")


def validate_settings(rc: RadarSettings, image_shape=None, channel_mult=None) -> None:
    """ConfigError (one line) for settings that cannot work; image_shape (H, W[, C]) adds
    the patch-against-image checks, channel_mult the U-Net's divisibility of the patch."""
    check_ranges(rc, RANGES, "score")
    if rc.schedule not in SCHEDULES:
        raise ConfigError(f"score.schedule must be one of {', '.join(SCHEDULES)}, got {rc.schedule!r}")
    if rc.schedule == "linear" and not 0.0 < rc.beta_start <= rc.beta_end < 1.0:
        raise ConfigError(f"score.beta_start/beta_end must satisfy 0 < start <= end < 1, "
                          f"got {rc.beta_start}, {rc.beta_end}")
    if rc.t_score != AUTO and not (isinstance(rc.t_score, int) and not isinstance(rc.t_score, bool)
                                   and 0 <= rc.t_score < rc.num_steps):
        raise ConfigError(f"score.t_score must be a timestep in 0..{rc.num_steps - 1} or {AUTO!r}, got {rc.t_score!r}")
    if isinstance(rc.sobel_smooth_sigma, str) and rc.sobel_smooth_sigma != AUTO:
        raise ConfigError(f"score.sobel_smooth_sigma must be a number >= 0 or {AUTO!r}, got {rc.sobel_smooth_sigma!r}")
    if rc.normalize != "none" and AUTO in (rc.t_score, rc.sobel_smooth_sigma):
        raise ConfigError(f"score.normalize={rc.normalize} needs score.t_score and score.sobel_smooth_sigma set, "
                          f"not {AUTO!r} (they are chosen on textures, where normalize is none)")
    for name, value, known in (("map_kind", rc.map_kind, MAP_KINDS),
                               ("channel_reduce", rc.channel_reduce, CHANNEL_REDUCTIONS),
                               ("feature_local", rc.feature_local, LOCAL_FEATURES),
                               ("normalize", rc.normalize, NORMALIZATIONS)):
        if value not in known:
            raise ConfigError(f"score.{name} must be one of {', '.join(known)}, got {value!r}")
    check_patch(rc.patch_size, rc.patch_stride, image_shape)
    if isinstance(rc.contamination, str):
        if rc.contamination != "auto":
            raise ConfigError(f"score.contamination must be a number in (0, 0.5] or 'auto', got {rc.contamination!r}")
    if channel_mult is not None:
        factor = 2 ** (len(channel_mult) - 1)
        if rc.patch_size % factor:
            raise ConfigError(f"score.patch_size {rc.patch_size} must be divisible by {factor} "
                              f"for net.channel_mult {tuple(channel_mult)}")


def validate(config) -> None:
    """ConfigError for RADAR settings `config.score` that cannot work with this config."""
    size = config.data.image_size
    validate_settings(config.score, (size, size), config.net.channel_mult)
    if config.net.num_classes:
        raise ConfigError("method radar trains an unconditional network: set net.num_classes=0")
