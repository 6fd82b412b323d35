"""How much of a demo texture's image AUROC is the draw of which crops carry a defect?

The demo's test split puts a defect on 20 of its 40 test crops, chosen at random, and the
crops come from four tiles of the photo. For each trained run on the embedded textures
this scores every test crop clean and with one defect of each kind (the generator's own
`add_defect`, at the run's level), then draws --draws random placements as the generator
makes them (which crops carry a defect, the kinds cycled in random order) and reports
the image AUROC over the draws (mean, median, 5% and 95% quantiles) beside the run's own
test split; the image AUROC of each kind against every clean crop; and, per test tile,
the clean crops' mean image score. Defect instances are drawn here (seeded per crop and
kind), not the test split's own, so the run's draw is read from its test split.

    python experiments/defect_placements.py --out OUT RUN [RUN ...] [--draws 5000]

About 2 minutes per texture on a 2-core CPU (240 crops scored). Writes
OUT/defect_placements.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import command_line, write_report  # noqa: E402


def placements(run, draws: int, seed: int = 0) -> dict:
    from fmjax import data as data_lib
    from fmjax.data import textures
    from fmjax.eval import metrics

    spec = run.data_info.get("spec", "")
    if not spec.startswith("textures:"):
        raise SystemExit(f"{run.path}: not a run on the embedded textures (data {spec!r})")
    name, config, size = spec.split(":", 1)[1], run.config.textures, run.config.data.image_size
    _, clean = textures.clean_crops(name, config, size)
    n, kinds = len(clean), list(textures.DEFECT_KINDS)
    score = lambda images: np.asarray(run.score(images[..., None])[1], np.float64)
    clean_scores = score(clean)
    defect_scores = {}
    for k, kind in enumerate(kinds):
        images = []
        for i in range(n):
            rng = np.random.default_rng([seed, i, k])
            donor = textures.donor_patch(name, config, size, rng) if kind == "cutpaste" else None
            images.append(textures.add_defect(clean[i], kind, rng, donor, config.defects)[0])
        defect_scores[kind] = score(np.stack(images))
    auroc = lambda s, y: metrics.image_metrics(s, y)["image_auroc"]
    n_bad = min(n, int(np.floor(config.anomaly_fraction * n + 0.5)))
    rng, aurocs = np.random.default_rng(seed), []
    for _ in range(draws):
        bad = rng.permutation(n)[:n_bad]
        scores, labels = clean_scores.copy(), np.zeros(n, np.int32)
        for i, kind in zip(bad, rng.permutation(np.resize(np.array(kinds), n_bad))):
            scores[i], labels[i] = defect_scores[str(kind)][i], 1
        aurocs.append(auroc(scores, labels))
    test = data_lib.load(spec, None, run.config.data, config).test
    tiles = np.arange(n) % len(textures.regions(config)[1])
    return {"texture": name, "test_crops": n, "anomalous": n_bad, "draws": draws,
            "test_split_auroc": auroc(score(test.images[..., 0]), test.labels),
            "mean": float(np.mean(aurocs)), "median": float(np.median(aurocs)),
            "q05": float(np.quantile(aurocs, 0.05)), "q95": float(np.quantile(aurocs, 0.95)),
            "per_kind": {kind: auroc(np.r_[clean_scores, s], np.r_[np.zeros(n), np.ones(n)])
                         for kind, s in defect_scores.items()},
            "clean_mean_score_per_tile": [float(clean_scores[tiles == t].mean()) for t in np.unique(tiles)],
            "image_threshold": run.calibration.get("image_threshold")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run folders on textures:NAME (e.g. fmjax_demo/gravel)")
    p.add_argument("--out", required=True)
    p.add_argument("--draws", type=int, default=5000)
    args = p.parse_args()
    from fmjax import runs
    from fmjax.app import launch

    launch.start()
    os.makedirs(args.out, exist_ok=True)
    rows = [placements(runs.load_run(path), args.draws) for path in args.runs]
    lines = ["# Image AUROC over random placements of the demo's defects", "", f"Command: `{command_line()}`", "",
             "| texture | test split | over placements: mean / median | 5% - 95% | per kind against every clean crop "
             "| clean crops' mean score per test tile | image threshold |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["per_kind"].items())
        tiles = " / ".join(f"{v:.2f}" for v in r["clean_mean_score_per_tile"])
        lines.append(f"| {r['texture']} | {r['test_split_auroc']:.3f} | {r['mean']:.3f} / {r['median']:.3f} | "
                     f"{r['q05']:.3f} - {r['q95']:.3f} | {kinds} | {tiles} | {r['image_threshold']:.2f} |")
    write_report(args.out, "defect_placements", rows, lines)


if __name__ == "__main__":
    main()
