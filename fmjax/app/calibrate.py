"""`fmjax calibrate`: fit what the run's method fits on normal images (thresholds, a
forest, normalisation) again on its held-out normals, with the scoring settings given,
and store it in the run: those settings are the run's from then on."""
from __future__ import annotations

from fmjax import runs

__all__ = ["calibrate", "main"]


def calibrate(run_dir: str, overrides=()) -> runs.Run:
    """Fits the run's method again with scoring `overrides` (score.*, the threshold
    quantiles) on the run's held-out normal training images and saves it as
    RUN/calibration.json (+ .npz), recording the settings; returns the Run."""
    run = runs.load_run(run_dir, overrides)
    if not run.refit:  # the same settings: fitted again all the same (data or code may have changed)
        run.fitted = runs.fit_run(run)
    runs.save_fitted(run_dir, run.fitted)
    run.refit = ""
    return run


def main(args) -> None:
    with runs.lock(args.run, "calibrate"):
        run = calibrate(args.run, args.set)
    values = run.calibration
    held_out = len(values.get(runs.HELD_OUT) or [])
    found = ", ".join(f"{k} {values[k]:.6g}" for k in ("image_threshold", "pixel_threshold") if k in values)
    print(f"calibrated on {held_out} held-out normal images ({found or 'nothing to threshold'}) "
          f"-> {args.run}/{runs.CALIBRATION}")
