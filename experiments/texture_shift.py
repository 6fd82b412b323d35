"""Do a texture run's held-out normals look like its test normals? Reads normal images only.

For each trained run on the embedded textures, scores (1) the held-out normals that set
its thresholds (the second half of the hold-out; the first fitted the statistics) and
(2) the test crops before any defect is drawn on them, and reports the AUROC that
separates the two by image score: 0.5 when the calibration's normals come from the test
normals' distribution, 1.0 when every clean test crop scores above every held-out one. It
also reports the share of clean test crops above the run's image threshold (the 0.99
quantile of the held-out normals: about 0.01 without a shift). No anomaly and no test
label is read.

    python experiments/texture_shift.py --out OUT RUN [RUN ...] [--set score.KEY=VALUE ...]

--set scores with other settings (fitted again on the run's held-out normals), e.g.
score.normalize=global or score.feature_map=0 to see which part of the map shifts.

Writes OUT/texture_shift.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import command_line, write_report  # noqa: E402


def shift(run, overrides=()) -> dict:
    from fmjax import data as data_lib
    from fmjax import runs
    from fmjax.data import textures
    from fmjax.eval import metrics

    spec = run.data_info.get("spec", "")
    if not spec.startswith("textures:"):
        raise SystemExit(f"{run.path}: not a run on the embedded textures (data {spec!r})")
    name = spec.split(":", 1)[1]
    train = runs.training_split(run.config, run.data_info)
    held = {n: i for i, n in enumerate(train.names)}
    holdout = train.subset([held[n] for n in run.calibration[runs.HELD_OUT]])
    thresholds = [held[n] for n in data_lib.split_halves(holdout)[1].names]
    _, clean = textures.clean_crops(name, run.config.textures, run.config.data.image_size)
    _, held_scores = run.score(train.images[thresholds])
    _, test_scores = run.score(clean[..., None])
    held_scores, test_scores = np.asarray(held_scores), np.asarray(test_scores)
    separation = metrics.image_metrics(np.r_[held_scores, test_scores],
                                       np.r_[np.zeros(len(held_scores)), np.ones(len(test_scores))])
    threshold = run.calibration["image_threshold"]
    return {"texture": name, "layout": run.config.textures.layout, "settings": " ".join(overrides) or "the run's",
            "held_out_normals": len(held_scores), "clean_test_crops": len(test_scores),
            "separation_auroc": separation["image_auroc"],
            "held_out_median": float(np.median(held_scores)), "clean_test_median": float(np.median(test_scores)),
            "clean_test_above_threshold": float(np.mean(test_scores > threshold))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run folders on textures:NAME")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE")
    args = p.parse_args()
    from fmjax import runs
    from fmjax.app import launch

    launch.start()
    os.makedirs(args.out, exist_ok=True)
    rows = [shift(runs.load_run(path, args.set), args.set) for path in args.runs]
    lines = ["# Held-out normals against clean test crops, by image score", "",
             f"Command: `{command_line()}`", "",
             "Separation AUROC: 0.5 when the two come from one distribution.", "",
             "| texture | layout | settings | held-out normals | clean test crops | separation AUROC | median score "
             "(held-out / test) | clean test crops above the image threshold |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['texture']} | {r['layout']} | {r['settings']} | {r['held_out_normals']} | "
                     f"{r['clean_test_crops']} | "
                     f"{r['separation_auroc']:.3f} | {r['held_out_median']:.2f} / {r['clean_test_median']:.2f} | "
                     f"{r['clean_test_above_threshold']:.3f} |")
    write_report(args.out, "texture_shift", rows, lines)


if __name__ == "__main__":
    main()
