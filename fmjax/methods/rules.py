"""Parsers of the rules that turn a map into an image score, shared by every map-based
method (pure Python, imported by the settings modules; the jitted rules are in
`fmjax.methods.maps`)."""
from __future__ import annotations

from fmjax.errors import ScoreRuleError

__all__ = ["IMAGE_SCORES", "parse_image_score"]

IMAGE_SCORES = ("max_plus_top1", "max", "topk_mean:f", "mean")


def parse_image_score(spec: str):
    """'max_plus_top1' | 'max' | 'topk_mean:f' | 'mean' -> (kind, fraction)."""
    name, _, arg = str(spec).partition(":")
    if name == "mean" and not arg:
        return "topk_mean", 1.0
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
    raise ScoreRuleError(f"unknown image score {spec!r} (known: {', '.join(IMAGE_SCORES)})")
