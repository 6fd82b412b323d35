"""The validation protocol's second stage for the network's own features: how the
`aligned` preset's feature image score and the `texture` preset's feature map measure
distance.

The first stage (select_settings.py) chose the image score `features` (score.feature_knn
= 5: the middle block's per-channel mean and std against a bank of the images the network
trained on). With that choice held, this stage scores each form of the features

  score.feature_grid    0 (per-channel mean and std) | 4 (the mean over 4 x 4 cells);
                        --grids adds others (e.g. 0,1,2,4,8: 8 x 8 cells is every
                        position of a 32-pixel image's middle block)
  score.feature_whiten  false | true (distances in the bank's whitened coordinates)

on the same validation data and the same runs: the held-out normal training images B
against training images of the other classes V, image AUROC, no test split. The form
with the best mean AUROC over the sets is chosen; one within 0.001 of a simpler form
(grid 0 before 4, plain before whitened) leaves the simpler one.

The first stage chose the `texture` preset's map: the mismatch mixed half and half with
the feature map (score.feature_map = 0.5, the encoder's features per position against a
coreset of the training images'). With that rule held, `--textures` scores

  score.patch_whiten    false | true (the feature map's distances in its bank's
                        whitened coordinates, the coreset drawn in them)

on the protocol's texture runs (select_settings.py, --texture-steps as there): the run's
own fit on A (one held-out tile), then B (the other) against B with three
self-supervised defects each, the mean of image and pixel AUROC; the same tie rule.

    python experiments/select_features.py --out experiments/results/selection/features --runs RUNS \
        --aligned fashion_mnist:0,...,digits:0,digits:1 [--textures brick,grass,gravel --texture-steps 600]

Writes OUT/<set>.json and OUT/features.{json,md} (aligned), OUT/texture_<set>.json and
OUT/patch_features.{json,md} (textures).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
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
TEXTURE_GRID = {"patch_whiten": (False, True)}
TEXTURE_FIELDS = tuple(TEXTURE_GRID)


def forms(grid: dict = GRID) -> list[dict]:
    """Every form of the grid, simplest first (what a tie keeps)."""
    fields = tuple(grid)
    return [dict(zip(fields, values)) for values in itertools.product(*(grid[f] for f in fields))]


def aligned_grid(grids: str) -> dict:
    """GRID with the feature grids of `grids` (comma-separated cells per side)."""
    return {**GRID, "feature_grid": tuple(int(g) for g in grids.split(","))}


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
    for form in forms(aligned_grid(args.grids)):
        scores = select_settings.feature_scores(run, trained, {n: sets[n] for n in ("B", "V")}, **form)
        rows.append({**form, "image_auroc": metrics.image_metrics(
            np.concatenate([scores["B"], scores["V"]]), labels)["image_auroc"]})
    result = {"set": name, "reason": reason, "sizes": {n: len(x) for n, x in sets.items()},
              "seconds": time.perf_counter() - start, "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def score_texture_set(name: str, args) -> dict:
    """The criterion (mean of image and pixel AUROC) of every texture form on one texture
    (OUT/texture_<set>.json, reused with --resume): the run's own fit on A with the
    `texture` preset's rule in that form, then its maps of B and of B's defects V."""
    from fmjax.data.base import normal_split
    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch.method import METHOD
    from fmjax.methods.flow_mismatch.settings import PRESETS

    path = os.path.join(args.out, f"texture_{name}.json")
    if args.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.perf_counter()
    run, sets, masks, kind, reason, trained = select_settings.validation_data(
        name, f"textures:{name}", None, "texture", args)
    if kind != "texture":
        raise SystemExit(f"{name} resolved to the {kind} preset: --textures scores texture sets")
    normals_a = normal_split(sets["A"], [f"A/{i}" for i in range(len(sets["A"]))])
    labels = np.r_[np.zeros(len(sets["B"])), np.ones(len(sets["V"]))]
    pixel_masks = np.concatenate([np.zeros((len(sets["B"]),) + masks.shape[1:], np.uint8), masks])
    rows = []
    for form in forms(TEXTURE_GRID):
        config = run.config.replace(score=dataclasses.replace(PRESETS["texture"], **form))
        probe = dataclasses.replace(run, config=config, _scorer=None)
        fitted = METHOD.fit(probe, trained, normals_a)
        maps, scores = (np.concatenate(parts) for parts in zip(*(
            probe.score(sets[n], None, fitted) for n in ("B", "V"))))
        row = {**form, "image_auroc": metrics.image_metrics(scores, labels)["image_auroc"],
               "pixel_auroc": metrics.pixel_metrics(maps, pixel_masks)["pixel_auroc"]}
        rows.append({**row, "criterion": (row["image_auroc"] + row["pixel_auroc"]) / 2})
        print(f"{name}: {rows[-1]}", flush=True)
    result = {"set": name, "reason": reason, "sizes": {n: len(x) for n, x in sets.items()},
              "seconds": time.perf_counter() - start, "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def choose(results: list[dict], grid: dict = GRID, criterion: str = "image_auroc") -> dict:
    """The form of `grid` with the best mean `criterion` over the sets (a form within
    0.001 of a simpler one's leaves the simpler), with every form's mean and per-set
    figures."""
    fields = tuple(grid)
    key = lambda row: tuple(row[f] for f in fields)
    table = {}
    for result in results:
        for row in result["rows"]:
            table.setdefault(key(row), {})[result["set"]] = row[criterion]
    order = [key(form) for form in forms(grid)]
    mean = {k: float(np.mean(list(table[k].values()))) for k in order}
    best = order[0]
    for k in order[1:]:
        if round(mean[k], 3) > round(mean[best], 3):
            best = k
    return {"setting": dict(zip(fields, best)), "criterion": mean[best], "sets": [r["set"] for r in results],
            "forms": [{**dict(zip(fields, k)), "criterion": mean[k], "per_set": table[k]} for k in order]}


REPORTS = {  # kind: (preset, report's file stem, title, criterion)
    "aligned": ("aligned", "features", "The aligned preset's feature image score",
                "mean over the one-class sets of the image AUROC of held-out normal training images against "
                "training images of the other classes (score.feature_knn = 5)"),
    "texture": ("texture", "patch_features", "The texture preset's feature map",
                "mean over the textures of (image AUROC + pixel AUROC) / 2 of held-out normal crops (one tile) "
                "against the same crops with three self-supervised defects each, the preset's rule fitted on "
                "another held-out tile"),
}


def write_report(chosen: dict, out: str, kind: str = "aligned") -> None:
    from fmjax.methods.flow_mismatch.settings import PRESETS

    preset_name, stem, title, criterion = REPORTS[kind]
    fields = tuple(chosen["setting"])
    preset = {f: getattr(PRESETS[preset_name], f) for f in fields}
    chosen["preset_agrees"] = preset == chosen["setting"]
    sets = chosen["sets"]
    lines = [f"# {title}, chosen on validation data", "",
             f"Command: `{command_line()}`", "",
             f"Criterion: {criterion}.", "",
             "Chosen: " + ", ".join(f"{f}={v}" for f, v in chosen["setting"].items()) +
             f" (criterion {chosen['criterion']:.3f}); fmjax's {preset_name} preset "
             f"{'agrees' if chosen['preset_agrees'] else 'DIFFERS'}.", "",
             "| " + " | ".join(fields) + " | criterion | " + " | ".join(sets) + " |",
             "|" + "---|" * (len(fields) + 1 + len(sets))]
    for form in chosen["forms"]:
        picked = all(form[f] == chosen["setting"][f] for f in fields)
        lines.append("| " + " | ".join(str(form[f]) + (" (chosen)" if picked and f == fields[0] else "")
                                       for f in fields) +
                     f" | {form['criterion']:.3f} | " + " | ".join(f"{form['per_set'][s]:.3f}" for s in sets) + " |")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the protocol's trained runs (default: OUT/runs)")
    p.add_argument("--aligned", default="fashion_mnist:0,digits:0,digits:1",
                   help="one-class sets: fashion_mnist:<class>, digits:<digit>")
    p.add_argument("--textures", default="", help="embedded textures (the texture stage), e.g. brick,grass,gravel")
    p.add_argument("--texture-steps", type=int, default=0, help="as for select_settings.py")
    p.add_argument("--grids", default=",".join(map(str, GRID["feature_grid"])),
                   help="score.feature_grid values to compare, simplest first (default: 0,4)")
    p.add_argument("--others", type=int, default=300, help="other-class images per set")
    p.add_argument("--repeats", type=int, default=3, help="defects per validation normal (textures)")
    p.add_argument("--resume", action="store_true", help="keep the sets already in OUT/<set>.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. train.steps=200): a training ablation on this "
                        "stage's validation data; use another --out and --runs")
    args = p.parse_args()
    from fmjax.app import launch

    launch.start()
    args.runs = args.runs or os.path.join(args.out, "runs")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for item in filter(None, args.aligned.split(",")):
        source, _, value = item.partition(":")
        if source == "digits":
            spec = select_settings.digits_folder(os.path.join(args.out, "digits"), int(value))
            results.append(score_set(f"digits_{value}", spec, f"digit_{value}", args))
        else:
            results.append(score_set(f"fashion_mnist_{value}", item, None, args))
    if results:
        write_report(choose(results, aligned_grid(args.grids)), args.out)
    textures = [score_texture_set(name, args) for name in filter(None, args.textures.split(","))]
    if textures:
        write_report(choose(textures, TEXTURE_GRID, "criterion"), args.out, "texture")


if __name__ == "__main__":
    main()
