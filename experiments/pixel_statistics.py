"""How many held-out normals per-pixel statistics need (score.normalize pixel against
global), on validation data only.

For each trained texture run, its held-out normals are cut in halves as
experiments/select_settings.py cuts them: A fits the statistics and the feature map's
scale, B are the validation normals, B with self-supervised defects (three per image)
the validation anomalies. The run's own rule is read with the statistics fitted on the
first n images of A, per pixel or per time only (global). No test split is read.

    python experiments/pixel_statistics.py --out OUT RUN [RUN ...]

Writes OUT/pixel_statistics.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patch_bank import validation_images  # noqa: E402
from table import command_line, write_report  # noqa: E402

COUNTS = (8, 13, 21)  # and all of A


def study(run) -> list[dict]:
    import jax.numpy as jnp

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.method import patch_bank
    from fmjax.methods.flow_mismatch.scorer import interior_times, time_weights
    from fmjax.methods.maps import image_score

    s = run.config.score
    a, b, v, masks, trained = validation_images(run)
    weights = time_weights(interior_times(s.num_times), s.time_weight)
    sets = {"A": a, "B": b, "V": v}
    per_time = {n: np.asarray(run.scorer.per_time(run.params, x)) for n, x in sets.items()}
    bank = patch_bank(run, trained)
    feature = {n: np.asarray(run.scorer.feature_maps(run.params, x, patches=bank)) for n, x in sets.items()}
    labels = np.r_[np.zeros(len(b)), np.ones(len(v))]
    all_masks = np.concatenate([np.zeros((len(b),) + masks.shape[1:], np.uint8), masks])
    rows = []
    for count in sorted(set(c for c in COUNTS if c < len(a)) | {len(a)}):
        for normalize in ("pixel", "global"):
            fit = {**per_time, "A": per_time["A"][:count]}
            stats = norm.fit_stats(fit["A"], weights, normalize)
            mismatch = {n: np.asarray(norm.mismatch_map(fit[n], weights, normalize, s.map_rule, stats)) for n in fit}
            scale = feat.map_scale(mismatch["A"], feature["A"][:count])
            maps = np.concatenate([np.asarray(feat.combine_maps(mismatch[n], feature[n], scale, s.feature_map))
                                   for n in ("B", "V")])
            scores = np.asarray(image_score(jnp.asarray(maps), s.image_score))
            row = {"statistics_images": count, "normalize": normalize,
                   "image_auroc": metrics.image_metrics(scores, labels)["image_auroc"],
                   "pixel_auroc": metrics.pixel_metrics(maps, all_masks)["pixel_auroc"]}
            row["criterion"] = (row["image_auroc"] + row["pixel_auroc"]) / 2
            rows.append(row)
            print(f"  {count:3d} images  {normalize:6s}  image {row['image_auroc']:.3f}  "
                  f"pixel {row['pixel_auroc']:.3f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained texture run folders")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from fmjax import runs
    from fmjax.app import launch

    launch.start()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for path in args.runs:
        name = os.path.basename(os.path.normpath(path))
        print(f"{name}:", flush=True)
        results[name] = study(runs.load_run(path))
    keys = sorted({(r["statistics_images"], r["normalize"]) for rows in results.values() for r in rows})
    lines = ["# Per-pixel against per-time statistics by the number of images that fit them", "",
             f"Command: `{command_line()}`", "", "Criterion: mean of image and pixel AUROC (image / pixel).", "",
             "| statistics images | normalize | " + " | ".join(results) + " | mean |",
             "|---|---|" + "---|" * (len(results) + 1)]
    for count, normalize in keys:
        cells = [next(r for r in rows if (r["statistics_images"], r["normalize"]) == (count, normalize))
                 for rows in results.values()]
        lines.append(f"| {count} | {normalize} | " + " | ".join(
            f"{c['criterion']:.3f} ({c['image_auroc']:.3f} / {c['pixel_auroc']:.3f})" for c in cells)
            + f" | {np.mean([c['criterion'] for c in cells]):.3f} |")
    write_report(args.out, "pixel_statistics", results, lines)


if __name__ == "__main__":
    main()
