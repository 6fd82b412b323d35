"""Flow Mismatching's scoring settings (docs/method.md, section 1), its presets and its
checks. Pure Python: the config imports this module without importing JAX."""
from __future__ import annotations

import dataclasses
import math

from fmjax.ranges import IMAGE_BATCH, PROBABILITY, SEED, SIGMA, Range
from fmjax.errors import ScoreRuleError
from fmjax.methods.rules import parse_image_score

__all__ = ["NEUTRAL", "PRESETS", "RANGES", "TRAINING", "FlowMismatchSettings", "Settings", "parse_aggregate",
           "validate"]

AGGREGATES = ("min", "rank:r", "quantile:a", "mean", "median", "trimmed:f")
TIME_WEIGHTS = ("t2", "none")
NORMALIZATIONS = ("none", "global", "pixel")
MAP_RULES = ("weighted", "two_sided", "combined", "learned")


@dataclasses.dataclass(frozen=True)
class FlowMismatchSettings:
    num_paths: int = 16  # K
    num_times: int = 30  # T, interior times j / (T + 1)
    aggregate: str = "rank:2"  # min | rank:r | quantile:a | mean | median | trimmed:f
    time_weight: str = "t2"  # t2 | none
    image_score: str = "max_plus_top1"  # max_plus_top1 | max | topk_mean:f | mean
    smooth_sigma: float = 0.0  # Gaussian smoothing of the per-time maps, in pixels; 0 = off
    # statistics of held-out normals (normalize.py): none (the paper's rule) | global (per
    # time) | pixel (per time and pixel)
    normalize: str = "none"
    map_rule: str = "weighted"  # weighted | two_sided | combined (normalize.py) | learned (learned.py)
    # k > 0: the image score is the distance of the network's own features to the k nearest
    # training normals' (features.py), not a rule of the map; 0: image_score of the map
    feature_knn: int = 0
    feature_bank: int = 4096  # most training normals in the feature memory bank (a seeded draw)
    # the features: 0 = the middle block's per-channel mean and std; g = its mean over g x g cells
    feature_grid: int = 0
    feature_whiten: bool = False  # distances in the bank's whitened coordinates (image_bank.py)
    # w in [0, 1]: the map mixes the standardised mismatch map (1 - w) with the map of the
    # network's encoder features against the training normals' (w, features.py); 0 = off
    feature_map: float = 0.0
    patch_bank: int = 8192  # most feature rows (image positions) in the feature map's bank (a coreset of more)
    patch_whiten: bool = False  # the feature map's distances in its bank's whitened coordinates (image_bank.py)
    chunk_size: int = 64  # network inputs per call (fixed: no recompiles); 0 = the largest that fits memory_budget_mb
    memory_budget_mb: int = 2048  # per device, for chunk_size = 0: params + stored mismatch + one call's activations
    image_batch: int = 4  # images per device per jitted call (padded: no recompiles)
    seed: int = 0
    use_ema: bool = True


Settings = FlowMismatchSettings

PRESETS = {
    "tiny": Settings(num_paths=4, num_times=4, aggregate="rank:2", chunk_size=16, image_batch=2),
    "small": Settings(num_paths=16, num_times=4, aggregate="rank:2", smooth_sigma=2.0, chunk_size=16, image_batch=1),
    "paper": Settings(num_paths=16, num_times=30, aggregate="rank:2", chunk_size=0, image_batch=1),
    # chosen by experiments/select_settings.py on validation data (README, "Presets")
    # its map: the mismatch (per-time statistics, both tails and the t^2-weighted mean)
    # mixed half and half with the encoder's features against the training normals', in
    # their bank's whitened coordinates (the second stage, experiments/select_features.py)
    "texture": Settings(num_paths=8, num_times=8, aggregate="rank:2", smooth_sigma=2.0, normalize="global",
                        map_rule="combined", feature_map=0.5, patch_whiten=True, chunk_size=16, image_batch=1),
    # its image score: the network's features against the 5 nearest training normals', on
    # a 4 x 4 grid, whitened (the second stage, experiments/select_features.py; image_score
    # applies when score.feature_knn=0)
    "aligned": Settings(num_paths=4, num_times=8, aggregate="rank:2", smooth_sigma=1.0, normalize="pixel",
                        map_rule="two_sided", image_score="mean", feature_knn=5, feature_grid=4, feature_whiten=True,
                        chunk_size=32, image_batch=4),
}
NEUTRAL = ("chunk_size", "memory_budget_mb", "image_batch")  # change how scores are computed, never their values
TRAINING = ()  # the flow model does not depend on any scoring setting
RANGES = {"num_paths": Range(1, 4096), "num_times": Range(1, 4096), "smooth_sigma": SIGMA,
          "feature_knn": Range(0, 1 << 16), "feature_bank": Range(1, 1 << 20), "feature_grid": Range(0, 64),
          "feature_map": PROBABILITY,
          "patch_bank": Range(1, 1 << 24), "chunk_size": Range(0, 1 << 20), "memory_budget_mb": Range(1, 1 << 24),
          "image_batch": IMAGE_BATCH, "seed": SEED}


def parse_aggregate(spec: str, num_paths: int):
    """'min' | 'rank:r' | 'quantile:a' | 'mean' | 'median' | 'trimmed:f' -> (kind, value).

    kind is 'rank' (value = 1-based order statistic r), 'mean', 'median' or 'trimmed'
    (value = number of paths cut from each end).
    """
    name, _, arg = str(spec).partition(":")
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
    raise ScoreRuleError(f"unknown aggregate {spec!r} (known: {', '.join(AGGREGATES)})")


def check_time_weight(rule: str) -> None:
    if rule not in TIME_WEIGHTS:
        raise ScoreRuleError(f"unknown time weight {rule!r} (known: {', '.join(TIME_WEIGHTS)})")


def check_map_rule(normalize: str, map_rule: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ScoreRuleError(f"unknown score.normalize {normalize!r} (known: {', '.join(NORMALIZATIONS)})")
    if map_rule not in MAP_RULES:
        raise ScoreRuleError(f"unknown score.map_rule {map_rule!r} (known: {', '.join(MAP_RULES)})")
    if map_rule != "weighted" and normalize == "none":
        raise ScoreRuleError(f"score.map_rule={map_rule} needs statistics of normal images: set score.normalize "
                             f"to global or pixel")


def validate(config) -> None:
    """ConfigError (one line) for Flow Mismatching settings `config.score` that cannot work."""
    s = config.score
    parse_aggregate(s.aggregate, s.num_paths)
    parse_image_score(s.image_score)
    check_time_weight(s.time_weight)
    check_map_rule(s.normalize, s.map_rule)
    if s.feature_knn and s.feature_grid:
        middle = config.data.image_size // 2 ** (len(config.net.channel_mult) - 1)
        if middle % s.feature_grid:
            raise ScoreRuleError(f"score.feature_grid={s.feature_grid} needs the middle block's size ({middle}, "
                                 f"data.image_size {config.data.image_size} over the network's "
                                 f"{len(config.net.channel_mult) - 1} downsamplings) to be a multiple of it: "
                                 f"choose a divisor of {middle}, or 0")
