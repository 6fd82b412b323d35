"""The flow reconstruction baseline's settings, presets and checks (docs/method.md,
section 3; all choices, the papers give none). Pure Python."""
from __future__ import annotations

import dataclasses

from fmjax.ranges import IMAGE_BATCH, SEED, SIGMA, Range, check_ranges
from fmjax.errors import ConfigError
from fmjax.methods.rules import parse_image_score

__all__ = ["INTEGRATORS", "NEUTRAL", "PRESETS", "RANGES", "TRAINING", "ReconSettings", "Settings", "validate"]

INTEGRATORS = ("euler", "heun")


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    t0: float = 0.5  # start time in [0, 1): 0 = from pure noise, near 1 = barely perturbed
    steps: int = 10  # N integration steps from t0 to 1
    method: str = "euler"  # euler | heun (2 network calls per step)
    image_score: str = "max_plus_top1"  # max_plus_top1 | max | topk_mean:f (as Flow Mismatching)
    smooth_sigma: float = 0.0  # Gaussian smoothing of the map, in pixels; 0 = off
    noise_seed: int = 0  # one noise image shared by every image: scores do not depend on the batch
    image_batch: int = 4  # images per device per jitted call (padded: no recompiles)
    use_ema: bool = True


Settings = ReconSettings

PRESETS = {
    "tiny": Settings(steps=4, image_batch=2),
    # the same smoothing as Flow Mismatching's small preset, so a comparison isolates the scoring rule
    "small": Settings(steps=10, smooth_sigma=2.0),
    "texture": Settings(steps=10, smooth_sigma=2.0),
    "aligned": Settings(steps=10, smooth_sigma=2.0),
}
NEUTRAL = ("image_batch",)
TRAINING = ()
RANGES = {"t0": Range(0.0, 1.0, high_open=True), "steps": Range(1, 100_000), "smooth_sigma": SIGMA,
          "noise_seed": SEED, "image_batch": IMAGE_BATCH}


def validate_settings(rc: ReconSettings) -> None:
    """ConfigError (one line) for settings that cannot work."""
    check_ranges(rc, RANGES, "score")
    if rc.method not in INTEGRATORS:
        raise ConfigError(f"score.method must be one of {', '.join(INTEGRATORS)}, got {rc.method!r}")
    parse_image_score(rc.image_score)


def validate(config) -> None:
    validate_settings(config.score)
