"""Test image AUROC of the `features` image score (score.feature_knn) of trained runs,
without scoring maps: for image-level sets (one-class Fashion-MNIST) where the maps'
scoring would cost all the time and no metric reads them.

    python experiments/feature_image_scores.py --out OUT RUN [RUN ...] [--knn 5] [--grid G] [--whiten]
        [--against DIR]

Each run's feature bank is drawn from the images its network trained on (the held-out
normals left out), exactly as `fmjax calibrate --set score.feature_knn=K` fits it, and
its test split is scored with the scorer's own feature path (tests/unit/test_features.py
checks that this equals the image scores `fmjax evaluate` reports). The image AUROC
beside the run's map-based one, when OUT_PREVIOUS/rows.json (--previous) has it, and,
with --against DIR (a compare_methods.py OUT/scores folder: DIR/<run folder name>.npz
holding `labels` and each method's test scores), DeLong's paired difference from each
of those methods on the same images. Writes OUT/rows.json, OUT/table.md and
OUT/scores/<run folder name>.npz.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import command_line  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run folders")
    p.add_argument("--out", required=True)
    p.add_argument("--knn", type=int, default=5, help="score.feature_knn (default 5)")
    p.add_argument("--grid", type=int, default=0, help="score.feature_grid (default 0)")
    p.add_argument("--whiten", action="store_true", help="score.feature_whiten")
    p.add_argument("--previous", help="a rows.json of the same runs' map-based evaluation, for comparison")
    p.add_argument("--against", help="compare_methods.py's OUT/scores folder of the same test images")
    args = p.parse_args()
    from fmjax import data as data_lib
    from fmjax import runs
    from fmjax.app import launch
    from fmjax.eval import intervals, metrics
    from select_settings import feature_scores

    launch.start()
    os.makedirs(os.path.join(args.out, "scores"), exist_ok=True)
    previous = {}
    if args.previous:
        with open(args.previous) as f:
            previous = {r["category"]: r["image_auroc"] for r in json.load(f)}
    rows = []
    for path in args.runs:
        start = time.perf_counter()
        run = runs.load_run(path)
        trained, _ = runs.holdout_split(run.config, runs.training_split(run.config, run.data_info))
        spec, category = run.data_info["spec"], run.data_info.get("category")
        test = data_lib.load(spec, None if spec.startswith("fashion_mnist:") else category, run.config.data,
                             run.config.textures).test
        scores = feature_scores(run, trained, {"test": test.images}, args.knn, args.grid, args.whiten)["test"]
        name = os.path.basename(os.path.normpath(path))
        np.savez_compressed(os.path.join(args.out, "scores", f"{name}.npz"), scores=scores, labels=test.labels)
        row = {"category": name, "image_auroc": metrics.image_metrics(scores, test.labels)["image_auroc"],
               "map_image_auroc": previous.get(name, float("nan")), "num_test": len(test),
               "bank": min(len(trained), run.config.score.feature_bank), "seconds": time.perf_counter() - start,
               "paired": {}}
        other = os.path.join(args.against or "", f"{name}.npz")
        if args.against and os.path.exists(other):
            with np.load(other) as stored:
                if not np.array_equal(stored["labels"], test.labels):
                    raise SystemExit(f"{other} scores other test images than {path}")
                row["paired"] = {method: intervals.auroc_difference(scores, stored[method], test.labels)
                                 for method in stored.files if method != "labels"}
        rows.append(row)
        print(f"{name}: features {row['image_auroc']:.3f} (map-based {row['map_image_auroc']:.3f}), "
              f"{row['seconds']:.0f} s", flush=True)
    mean = {"category": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in ("image_auroc", "map_image_auroc")}}
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    form = f"feature_knn = {args.knn}, feature_grid = {args.grid}, feature_whiten = {args.whiten}"
    lines = [f"# Image AUROC of the features image score ({form})", "",
             f"Command: `{command_line()}`", "", "| run | features | map-based | test images | bank | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['category']} | {r['image_auroc']:.3f} | {r['map_image_auroc']:.3f} | {r['num_test']} | "
              f"{r['bank']} | {r['seconds']:.0f} |" for r in rows]
    lines.append(f"| mean | {mean['image_auroc']:.3f} | {mean['map_image_auroc']:.3f} | | | |")
    paired = [(r["category"], m, d) for r in rows for m, d in r["paired"].items()]
    if paired:
        lines += ["", "DeLong's paired difference on the same test images (features minus the method):", "",
                  "| run | method | its AUROC | difference | 95% interval | p |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m} | {d['auroc_b']:.3f} | {d['difference']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
                  f"{d['p_value']:.2g} |" for name, m, d in paired]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
