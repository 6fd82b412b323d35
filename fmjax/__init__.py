"""fmjax: unsupervised visual anomaly detection with flow-matching and diffusion models.

    import fmjax
    det = fmjax.train("textures:brick", "runs/brick")     # or fmjax.load("runs/brick")
    maps, scores, anomalous = det.score(images)

`train`, `load` and `Detector` live in `fmjax.api` (imported on first use, so `import
fmjax` stays light and `fmjax.serving` needs only JAX and numpy). Packages: config
(every setting), methods (Flow Mismatching, RADAR, the reconstruction baseline, behind one
interface), nets (the U-Net), flow (paths, loss), training (one step, one loop,
checkpoints), distributed (meshes, collectives, multi-host), data (readers), eval
(metrics, calibration, writers, plots), runs (run folders), serving (exported scorers),
app (the command line and how programs start).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fmjax.version import __version__
__all__ = ["Detector", "Scored", "__version__", "load", "train"]

if TYPE_CHECKING:
    from fmjax.api import Detector, load, train
    from fmjax.serving import Scored


def __getattr__(name: str):
    if name in ("Detector", "load", "train"):
        from fmjax import api

        return getattr(api, name)
    if name == "Scored":
        from fmjax.serving import Scored

        return Scored
    raise AttributeError(f"module 'fmjax' has no attribute {name!r}")
