"""The values each numeric setting may take (`Range`) and the check of a settings
dataclass against a table of them; pure Python, shared by the config and the method
settings without either importing the other."""
from __future__ import annotations

import dataclasses
import math

from fmjax.errors import ConfigError

__all__ = ["FRACTION", "IMAGE_BATCH", "INT32", "PROBABILITY", "SEED", "SIGMA", "UINT32", "Range", "check_ranges"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [low, high], an end excluded when open.
    An int setting must be an int, a float one a finite number; a tuple setting's items
    each lie in the range."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (str(v) if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


INT32, UINT32 = 2 ** 31 - 1, 2 ** 32 - 1  # step counters are int32; PRNG seeds wrap at 2**32
SEED = Range(0, UINT32)
FRACTION = Range(0.0, 1.0, high_open=True)  # e.g. the share of images held out
PROBABILITY = Range(0.0, 1.0)
SIGMA = Range(0.0, 1000.0)  # a smoothing width in pixels; 0 = off
IMAGE_BATCH = Range(1, 4096)


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def check_ranges(section, ranges: dict, prefix: str) -> None:
    """ConfigError (one line) for the first field of dataclass `section` outside its Range
    in `ranges` (name -> Range), or of the wrong type; a string value is left to the
    section's own checks (e.g. RADAR's contamination 'auto')."""
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    for name, allowed in ranges.items():
        value, default = getattr(section, name), defaults[name]
        items = value if isinstance(default, tuple) else (value,)
        if isinstance(value, str):
            continue
        integer = isinstance(default, (int, tuple)) and not isinstance(default, bool)
        kind = "integers" if isinstance(default, tuple) else "an integer" if integer else "a number"
        ok = isinstance(items, tuple) and all(
            (isinstance(v, int) and not isinstance(v, bool)) if integer else _finite(v) for v in items)
        if not ok or not all(v in allowed for v in items):
            raise ConfigError(f"{prefix}.{name} must be {kind} in {allowed}, got {value!r}")
