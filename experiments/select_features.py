"""The validation protocol's second stage for the `aligned` preset's feature image score:
which features, and how their distance is measured.

The first stage (select_settings.py) chose the image score `features` (score.feature_knn
= 5: the middle block's per-channel mean and std against a bank of the images the network
trained on). With that choice held, this stage scores each form of the features

  score.feature_grid    0 (per-channel mean and std) | 4 (the mean over 4 x 4 cells)
  score.feature_whiten  false | true (distances in the bank's whitened coordinates)

on the same validation data and the same runs: the held-out normal training images B
against training images of the other classes V, image AUROC, no test split. The form
with the best mean AUROC over the sets is chosen; one within 0.001 of a simpler form
(grid 0 before 4, plain before whitened) leaves the simpler one.

    python experiments/select_features.py --out experiments/results/selection/features --runs RUNS \
        --aligned fashion_mnist:0,...,digits:0,digits:1

Writes OUT/<set>.json and OUT/features.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_settings  # noqa: E402
from table import command_line  # noqa: E402

GRID = {"feature_grid": (0, 4), "feature_whiten": (False, True)}
FIELDS = tuple(GRID)


def forms() -> list[dict]:
    """Every form of the grid, simplest first (what a tie keeps)."""
    return [{"feature_grid": g, "feature_whiten": w} for g in GRID["feature_grid"] for w in GRID["feature_whiten"]]


def score_set(name: str, spec: str, category, args) -> dict:
    """The image AUROC of every form on one set (OUT/<set>.json, reused with --resume)."""
    from fmjax.eval import metrics

    path = os.path.join(args.out, f"{name}.json")
    if args.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.perf_counter()
    run, sets, _, kind, reason, trained = select_settings.validation_data(name, spec, category, "aligned", args)
    if kind != "aligned":
        raise SystemExit(f"{name} resolved to the {kind} preset: this stage scores one-class (aligned) sets")
    labels = np.r_[np.zeros(len(sets["B"])), np.ones(len(sets["V"]))]
    rows = []
    for form in forms():
        scores = select_settings.feature_scores(run, trained, {n: sets[n] for n in ("B", "V")}, **form)
        rows.append({**form, "image_auroc": metrics.image_metrics(
            np.concatenate([scores["B"], scores["V"]]), labels)["image_auroc"]})
    result = {"set": name, "reason": reason, "sizes": {n: len(x) for n, x in sets.items()},
              "seconds": time.perf_counter() - start, "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def choose(results: list[dict]) -> dict:
    """The form with the best mean AUROC over the sets (a form within 0.001 of a simpler
    one's leaves the simpler), with every form's mean and per-set figures."""
    key = lambda row: tuple(row[f] for f in FIELDS)
    table = {}
    for result in results:
        for row in result["rows"]:
            table.setdefault(key(row), {})[result["set"]] = row["image_auroc"]
    order = [key(form) for form in forms()]
    mean = {k: float(np.mean(list(table[k].values()))) for k in order}
    best = order[0]
    for k in order[1:]:
        if round(mean[k], 3) > round(mean[best], 3):
            best = k
    return {"setting": dict(zip(FIELDS, best)), "criterion": mean[best], "sets": [r["set"] for r in results],
            "forms": [{**dict(zip(FIELDS, k)), "criterion": mean[k], "per_set": table[k]} for k in order]}


def write_report(chosen: dict, out: str) -> None:
    from fmjax.methods.flow_mismatch.settings import PRESETS

    preset = {f: getattr(PRESETS["aligned"], f) for f in FIELDS}
    chosen["preset_agrees"] = preset == chosen["setting"]
    sets = chosen["sets"]
    lines = ["# The aligned preset's feature image score, chosen on validation data", "",
             f"Command: `{command_line()}`", "",
             "Criterion: mean over the one-class sets of the image AUROC of held-out normal training images "
             "against training images of the other classes (score.feature_knn = 5).", "",
             "Chosen: " + ", ".join(f"{f}={v}" for f, v in chosen["setting"].items()) +
             f" (criterion {chosen['criterion']:.3f}); fmjax's aligned preset "
             f"{'agrees' if chosen['preset_agrees'] else 'DIFFERS'}.", "",
             "| " + " | ".join(FIELDS) + " | criterion | " + " | ".join(sets) + " |",
             "|" + "---|" * (len(FIELDS) + 1 + len(sets))]
    for form in chosen["forms"]:
        picked = all(form[f] == chosen["setting"][f] for f in FIELDS)
        lines.append("| " + " | ".join(str(form[f]) + (" (chosen)" if picked and f == FIELDS[0] else "")
                                       for f in FIELDS) +
                     f" | {form['criterion']:.3f} | " + " | ".join(f"{form['per_set'][s]:.3f}" for s in sets) + " |")
    with open(os.path.join(out, "features.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "features.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the protocol's trained runs (default: OUT/runs)")
    p.add_argument("--aligned", default="fashion_mnist:0,digits:0,digits:1",
                   help="one-class sets: fashion_mnist:<class>, digits:<digit>")
    p.add_argument("--others", type=int, default=300, help="other-class images per set")
    p.add_argument("--resume", action="store_true", help="keep the sets already in OUT/<set>.json")
    args = p.parse_args()
    from fmjax.app import launch

    launch.start()
    args.runs = args.runs or os.path.join(args.out, "runs")
    args.set, args.texture_steps = [], 0
    os.makedirs(args.out, exist_ok=True)
    results = []
    for item in filter(None, args.aligned.split(",")):
        source, _, value = item.partition(":")
        if source == "digits":
            spec = select_settings.digits_folder(os.path.join(args.out, "digits"), int(value))
            results.append(score_set(f"digits_{value}", spec, f"digit_{value}", args))
        else:
            results.append(score_set(f"fashion_mnist_{value}", item, None, args))
    write_report(choose(results), args.out)


if __name__ == "__main__":
    main()
