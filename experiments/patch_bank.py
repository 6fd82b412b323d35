"""Which rows the feature map's bank keeps (score.patch_bank), on validation data only.

For each trained texture run, its held-out normal training images are cut in two halves
as experiments/select_settings.py cuts them: A fits the map's statistics and scale, B
are the validation normals, and B with self-supervised defects (three per image,
fmjax/data/synthetic.py) the validation anomalies. The run's own scoring rule
is read with banks drawn in different ways from the images the network trained on:

  random   a seeded random draw of score.patch_bank rows (the rule before the coreset)
  all      every row
  coreset  greedy k-center coresets (`features.coreset`) of several sizes, their
           distances measured after random projections to several dimensions

No test split is read. The criterion is select_settings.py's: the mean of image and
pixel AUROC.

    python experiments/patch_bank.py --out OUT RUN [RUN ...]

Writes OUT/patch_bank.json (every bank's figures and the seconds its draw took) and
OUT/patch_bank.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmjax.data.synthetic import anomaly_set  # noqa: E402
from table import command_line  # noqa: E402

SIZES = (4096, 8192, 16384)
DIMS = (16, 32, None)  # None: no projection


def validation_images(run):
    """(A, B, V uint8 [N, H, W, C], masks of V uint8 [M, H, W], the trained Split)."""
    from fmjax import data as data_lib
    from fmjax import runs

    train = runs.training_split(run.config, run.data_info)
    trained, holdout = runs.holdout_split(run.config, train)
    a, b = (half.images for half in data_lib.split_halves(holdout))
    v, masks = anomaly_set(np.concatenate([b] * 3), a, seed=2)
    return a, b, v, masks, trained


def banks(run, trained, size: int):
    """{name: (features.Bank, seconds)} of every way to draw the bank."""
    import jax

    from fmjax.methods.flow_mismatch import features as feat

    rows = run.scorer.patch_features(run.params, trained.images)
    every = feat.bank_from_features(rows.reshape(-1, rows.shape[-1]))
    pick = np.random.default_rng([run.config.score.seed, 17]).permutation(len(every.features))[:size]
    out = {"all": (every, 0.0), "random": (every._replace(features=every.features[np.sort(pick)]), 0.0)}
    for count in SIZES:
        for dim in DIMS:
            start = time.perf_counter()
            keep = feat.coreset(every.features, count, jax.random.PRNGKey(run.config.score.seed),
                                dim=dim)
            out[f"coreset {count} dim {dim or 'all'}"] = (every._replace(features=every.features[np.sort(keep)]),
                                                         time.perf_counter() - start)
    return out


def study(run) -> list[dict]:
    import jax.numpy as jnp

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import interior_times, time_weights
    from fmjax.methods.maps import image_score

    s = run.config.score
    a, b, v, masks, trained = validation_images(run)
    weights = time_weights(interior_times(s.num_times), s.time_weight)
    mismatch, stats = {}, None
    for name, images in (("A", a), ("B", b), ("V", v)):
        per_time = run.scorer.per_time(run.params, images)
        if stats is None:
            stats = norm.fit_stats(per_time, weights, s.normalize) if s.normalize != "none" else \
                norm.neutral_stats(s.num_times)
        mismatch[name] = np.asarray(norm.mismatch_map(per_time, weights, s.normalize, s.map_rule, stats))
    labels = np.r_[np.zeros(len(b)), np.ones(len(v))]
    all_masks = np.concatenate([np.zeros((len(b),) + masks.shape[1:], np.uint8), masks])
    rows = []
    for name, (bank, seconds) in banks(run, trained, s.patch_bank).items():
        feature = {n: run.scorer.feature_maps(run.params, x, patches=bank) for n, x in (("A", a), ("B", b), ("V", v))}
        scale = feat.map_scale(mismatch["A"], feature["A"])
        maps = np.concatenate([np.asarray(feat.combine_maps(mismatch[n], feature[n], scale, s.feature_map))
                               for n in ("B", "V")])
        scores = np.asarray(image_score(jnp.asarray(maps), s.image_score))
        row = {"bank": name, "rows": int(len(bank.features)), "draw_seconds": seconds,
               "image_auroc": metrics.image_metrics(scores, labels)["image_auroc"],
               "pixel_auroc": metrics.pixel_metrics(maps, all_masks)["pixel_auroc"]}
        row["criterion"] = (row["image_auroc"] + row["pixel_auroc"]) / 2
        rows.append(row)
        print(f"  {name:24s} rows {row['rows']:6d}  image {row['image_auroc']:.3f}  pixel {row['pixel_auroc']:.3f}  "
              f"({seconds:.1f} s)", flush=True)
    return rows


def write_report(results: dict, out: str, command: str) -> None:
    names = [r["bank"] for r in next(iter(results.values()))]
    sets = list(results)
    lines = ["# The feature map's bank on validation data (mean of image and pixel AUROC)", "",
             f"Command: `{command}` (the draw timed on this machine).", "",
             f"Runs: {', '.join(sets)}. Each cell: criterion (image / pixel AUROC); draw: seconds of the draw "
             "(the mean over runs).", "",
             "| bank | rows | " + " | ".join(sets) + " | mean | draw s |", "|---|---|" + "---|" * (len(sets) + 2)]
    for i, name in enumerate(names):
        cells = [results[s][i] for s in sets]
        lines.append(f"| {name} | {cells[0]['rows']} | " + " | ".join(
            f"{c['criterion']:.3f} ({c['image_auroc']:.3f} / {c['pixel_auroc']:.3f})" for c in cells)
            + f" | {np.mean([c['criterion'] for c in cells]):.3f} | {np.mean([c['draw_seconds'] for c in cells]):.1f} |")
    means = {name: np.mean([results[s][i]["criterion"] for s in sets]) for i, name in enumerate(names)}
    best = max(means, key=means.get)
    lines += ["", f"Best mean criterion: **{best}** ({means[best]:.3f}); the random draw: {means['random']:.3f}."]
    with open(os.path.join(out, "patch_bank.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run folders (texture preset: score.feature_map > 0)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from fmjax import runs
    from fmjax.app import launch

    launch.start()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for run_dir in args.runs:
        run = runs.load_run(run_dir)
        if not run.config.score.feature_map:
            raise SystemExit(f"{run_dir}: its scoring rule has no feature map (score.feature_map = 0)")
        name = os.path.basename(os.path.normpath(run_dir))
        print(f"{name}:", flush=True)
        results[name] = study(run)
    with open(os.path.join(args.out, "patch_bank.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, args.out, command_line())


if __name__ == "__main__":
    main()
