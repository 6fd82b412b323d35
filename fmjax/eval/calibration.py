"""Thresholds fitted on held-out NORMAL images only (never on test labels)."""
from __future__ import annotations

import numpy as np

from fmjax.eval.metrics import threshold_from_normals

__all__ = ["thresholds"]


def thresholds(calibration, normal_maps, normal_scores) -> dict:
    """{"image_threshold", "pixel_threshold", "display_max", "num_normal_images"} from the
    maps float [M,H,W] and scores float [M] of held-out normal images, at the quantiles of
    `calibration` (a CalibrationConfig); display_max is the top of the heat maps' colour
    scale (twice the pixel threshold)."""
    pixel_threshold = float(np.quantile(normal_maps, calibration.pixel_threshold_quantile))
    return {"image_threshold": threshold_from_normals(normal_scores, calibration.image_threshold_quantile),
            "pixel_threshold": pixel_threshold,
            "display_max": 2.0 * pixel_threshold,
            "num_normal_images": int(len(normal_scores))}
