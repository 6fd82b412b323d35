"""The validation protocol that chooses RADAR's scoring settings (t_score, the blur before
Sobel and, for one-class sets, the per-pixel standardisation of the noise map, the map
feature and the one-sided forest), on the training images only: the default from
textures, the `aligned` preset's from one-class sets.

No test split is read. For each texture the RADAR run of what `auto` resolves to is
trained (or reused), and its held-out normal training images, which the network never
saw, are cut in two halves A and B. Each half gets self-supervised defects
(fmjax/data/synthetic.py, `--repeats` per image, the other half as the paste
source). Two folds: the Isolation Forest is fitted on the features of A and scores B and
B's defects, then the other way round. The criterion of a setting is the mean over the
folds and textures of (image AUROC + pixel AUROC) / 2; the best one is chosen (criteria
within 0.001: the larger t_score, the paper's side).

One-class sets (`--aligned`) are scored the same way with the training images of the
other classes as the anomalies (image AUROC alone, as experiments/select_settings.py
scores them); their choice is RADAR's `aligned` preset. With normalize = pixel the
fitting half is cut in two again (statistics, then the forest), as `Radar.fit` does.
Their grid also has the memory bank's distance (score.feature_knn; the bank from the
images the network trained on). `--fix` holds grid fields at one value: a second stage
at an earlier stage's choice, with its own --out.

    python experiments/select_radar.py --out experiments/results/selection --textures brick,grass,gravel
    python experiments/select_radar.py --out experiments/results/selection --textures "" \
        --aligned fashion_mnist:0,fashion_mnist:1,digits:0,digits:1
    python experiments/select_radar.py --out experiments/results/selection/radar_aligned_knn --textures "" \
        --aligned fashion_mnist:6,digits:0 --runs RUNS \
        --fix t_score=500,sobel_smooth_sigma=0,normalize=pixel,one_sided=true,map_feature=true

Writes OUT/radar_<set>.json (every setting's figures per set and fold) and, per kind,
OUT/radar.{json,md} (textures) or OUT/radar_aligned.{json,md} (one-class sets): the
choice, the paper's default beside it, and whether fmjax's agrees.
`--runs DIR` reuses runs at DIR/<texture> (e.g. experiments/compare_methods.py's
OUT/runs/<texture>/radar folders, linked there).
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
from fmjax.data.synthetic import anomaly_set  # noqa: E402
from table import command_line  # noqa: E402

GRID = {"t_score": (10, 25, 50, 100, 250, 500), "sobel_smooth_sigma": (0.0, 1.0, 2.0, 4.0, 8.0)}
# both kinds add the one-sided forest and the map feature; one-class sets add the per-pixel
# standardisation of the noise map (aligned images only: a texture's pixels share one distribution)
GRIDS = {"texture": {**GRID, "one_sided": (False, True), "map_feature": (False, True)},
         "aligned": {"t_score": (100, 250, 500), "sobel_smooth_sigma": (0.0, 1.0, 2.0),
                     "normalize": ("none", "pixel"), "one_sided": (False, True), "map_feature": (False, True),
                     "feature_knn": (0, 5)}}
PAPER_SIDE = {"normalize": "none", "one_sided": False, "map_feature": False, "feature_knn": 0}  # ties: the paper's
# settings that change no map: rows that differ only in them share maps
FOREST_SIDE = ("one_sided", "map_feature", "feature_knn")


def _same_value(value, text: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).lower() == text.lower()
    try:
        return float(text) == value
    except ValueError:
        return False


def grid_of(kind: str, fix: str = "") -> dict:
    """GRIDS[kind] with the fields named in `fix` ("field=value,...") held at that value
    (a later stage, at an earlier stage's choice); a value must be one of the grid's."""
    grid = dict(GRIDS[kind])
    for item in filter(None, fix.split(",")):
        field, _, text = item.partition("=")
        matches = [v for v in grid.get(field, ()) if _same_value(v, text.strip())]
        if not matches:
            raise SystemExit(f"--fix {item}: {field} takes one of {grid.get(field, 'nothing in this grid')}")
        grid[field] = (matches[0],)
    return grid


def _trained(config):
    return (config.method, config.net, config.data.image_size, config.train.steps, config.train.patch_size,
            config.train.batch_size, config.textures)


def radar_run(name: str, spec: str, runs_dir: str, category: str | None = None):
    """(run, normal training Split) of the `auto` config for method radar; trains when the
    folder is missing, reuses it when it trained the same network."""
    from fmjax import runs
    from fmjax.app.train import resolve_auto, train_run

    config, data, reason = resolve_auto(spec, category, "radar")
    run_dir = os.path.join(runs_dir, name)
    if os.path.isdir(run_dir):
        run = runs.load_run(run_dir)
        if _trained(run.config) != _trained(config):
            raise SystemExit(f"{run_dir} was trained with another config: move it away")
        return run, data[0]
    print(f"{name}: training radar ({reason}) ...", flush=True)
    return train_run(config, spec, category, run_dir, progress=False, data=data), data[0]


def fold_maps(params, scorer, halves: dict, anomalies: dict, standardized: bool, bank=None) -> dict:
    """Per fold (test half "A" or "B"): {"fit": the forest's half, the test half, "V" + the
    test half: its anomalies}, each (maps, features) of `scorer`. `standardized`: the
    fitting half is cut in two again, as `Radar.fit` cuts the held-out normals (statistics
    on the first, the forest on the second). bank: the memory bank's arrays
    (`image_bank.to_arrays`) for a scorer with score.feature_knn."""
    from fmjax.methods.base import Fitted
    from fmjax.methods.radar import standardize

    folds = {}
    for fit, test in (("A", "B"), ("B", "A")):
        for_forest, stats = halves[fit], Fitted(arrays=dict(bank or {}))
        if standardized:
            half = len(for_forest) // 2
            stats = Fitted(arrays={**stats.arrays, **standardize.fit(scorer.noise_maps(params, for_forest[:half]))})
            for_forest = for_forest[half:]
        folds[test] = {name: scorer.maps_and_features(params, images, None, stats)
                       for name, images in (("fit", for_forest), (test, halves[test]), (f"V{test}", anomalies[test][0]))}
    return folds


def fold_rows(run, halves: dict, anomalies: dict, grid: dict, trained=None) -> list[dict]:
    """Every setting of `grid`: per fold (forest on one half, the other half's normals and
    anomalies {half: (images, masks or None)} scored), image AUROC and, where the
    anomalies have masks, pixel AUROC; the criterion is their mean (image AUROC alone
    without masks). The maps are `fold_maps`'. trained: the images the network trained on
    (a Split), whose features fill the memory bank of the settings with feature_knn."""
    from fmjax.eval import metrics
    from fmjax.methods import image_bank
    from fmjax.methods.radar import forest as forest_lib
    from fmjax.methods.radar.method import METHOD
    from fmjax.nets.unet import build_model

    _, apply_fn = build_model(run.config.net, run.image_shape)
    pixels = all(masks is not None for _, masks in anomalies.values())
    knn = max(grid.get("feature_knn", (0,)))
    fields, rows, maps_key, folds, bank = tuple(grid), [], None, None, None
    for values in itertools.product(*grid.values()):
        settings = dataclasses.replace(run.config.score, **dict(zip(fields, values)))
        row = dict(zip(fields, values))
        if maps_key != (key := tuple(v for f, v in row.items() if f not in FOREST_SIDE)):
            # read with the map feature (the third column) and the bank distance (the last):
            # the rows without them drop them
            read = dataclasses.replace(settings, map_feature=True, feature_knn=knn)
            scorer = METHOD.scorer(run.config.replace(score=read), apply_fn, run.image_shape)
            if knn and bank is None:
                bank = image_bank.to_arrays(image_bank.draw_bank(
                    lambda images, class_ids: scorer.features(run.params, images, class_ids), trained,
                    read.feature_bank, read.forest_seed))
            maps_key, folds = key, fold_maps(run.params, scorer, halves, anomalies, settings.normalize == "pixel",
                                             bank)
        columns = [0, 1] + [2] * settings.map_feature + [3] * bool(knn and settings.feature_knn)
        for test, out in folds.items():
            forest = forest_lib.fit(out["fit"][1][:, columns], settings)
            scores = np.r_[forest_lib.score(forest, out[test][1][:, columns]),
                           forest_lib.score(forest, out[f"V{test}"][1][:, columns])]
            labels = np.r_[np.zeros(len(out[test][1])), np.ones(len(out[f"V{test}"][1]))]
            row[f"image_auroc_{test}"] = metrics.image_metrics(scores, labels)["image_auroc"]
            if pixels:
                maps = np.concatenate([out[test][0], out[f"V{test}"][0]])
                masks = np.concatenate([np.zeros(out[test][0].shape, np.uint8), anomalies[test][1]])
                row[f"pixel_auroc_{test}"] = metrics.pixel_metrics(maps, masks)["pixel_auroc"]
        row["image_auroc"] = float(np.mean([row["image_auroc_A"], row["image_auroc_B"]]))
        row["pixel_auroc"] = float(np.mean([row["pixel_auroc_A"], row["pixel_auroc_B"]])) if pixels else None
        row["criterion"] = (row["image_auroc"] + row["pixel_auroc"]) / 2 if pixels else row["image_auroc"]
        rows.append(row)
    return rows


def validation_set(item: str, kind: str, args) -> dict:
    """A texture (`name`: self-supervised defects on each half) or a one-class set
    (`fashion_mnist:C` or `digits:D`: the training images of the other classes) scored
    with every setting of GRIDS[kind], stored in OUT/radar_<set>.json."""
    from fmjax import data as data_lib

    source, _, value = item.partition(":")
    name = item if kind == "texture" else f"{source}_{value}"
    path = os.path.join(args.out, f"radar_{name}.json")
    if args.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.perf_counter()
    if kind == "texture":
        run, train = radar_run(name, f"textures:{name}", args.runs)
    elif source == "digits":
        folder = select_settings.digits_folder(os.path.join(args.out, "digits"), int(value))
        run, train = radar_run(name, folder, args.runs, f"digit_{value}")
    else:
        run, train = radar_run(name, item, args.runs)
    cal = run.config.calibration
    trained, holdout = data_lib.split_holdout(train, cal.holdout_fraction, cal.seed, cal.min_holdout)
    a, b = data_lib.split_halves(holdout)
    n = min(len(a), len(b))
    halves = {"A": a.images[:n], "B": b.images[:n]}
    if kind == "texture":
        anomalies = {k: anomaly_set(np.concatenate([halves[k]] * args.repeats), halves["B" if k == "A" else "A"],
                                    seed=i + 2) for i, k in enumerate("AB")}
    else:
        others = select_settings.other_class_images(item, run.config.data.image_size, args.others, seed=1)
        anomalies = {k: (others, None) for k in "AB"}
    result = {"set": name, "kind": kind, "sizes": {k: len(v) for k, v in halves.items()},
              "rows": fold_rows(run, halves, anomalies, grid_of(kind, args.fix), trained),
              "seconds": time.perf_counter() - start}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def scored_fields(results: list[dict], kind: str) -> tuple:
    """The fields of GRIDS[kind] that every stored row has: sets scored before a field
    joined the grid (e.g. feature_knn) are read as the stage they were."""
    return tuple(f for f in GRIDS[kind] if all(f in row for r in results for row in r["rows"]))


def choose(results: list[dict], kind: str = "texture") -> dict:
    """The setting of the grid's scored fields (`scored_fields`) with the best mean
    criterion over the sets (ties: the larger t_score, then the smaller blur, then the
    paper's PAPER_SIDE values); "best": its values in GRIDS[kind]'s order."""
    fields, table = scored_fields(results, kind), {}
    for result in results:
        for row in result["rows"]:
            table.setdefault(tuple(row[f] for f in fields), []).append(row)
    mean = {k: float(np.mean([r["criterion"] for r in rows])) for k, rows in table.items()}
    best = max(mean, key=lambda k: (round(mean[k], 3), k[0], -k[1],
                                    *(v == PAPER_SIDE[f] for f, v in zip(fields[2:], k[2:]))))
    return {"setting": dict(zip(fields, best)), "best": best, "criterion": mean[best], "mean": mean, "table": table}


def _fold_criterion(row: dict, fold: str) -> float:
    return (row[f"image_auroc_{fold}"] + row[f"pixel_auroc_{fold}"]) / 2


def with_per_run_choice(chosen: dict, results: list[dict]) -> dict:
    """`chosen` (a texture choice) with "per_run": the criterion of choosing t_score and
    the blur per set, as `score.t_score = auto` does on a run's own held-out normals
    (fmjax/methods/radar/choice.py; the other settings as chosen): chosen on one fold's
    figures, read on the other fold's, both ways round, averaged over the folds and sets.
    Where it beats the best single setting, the setting's t_score and blur become "auto"."""
    from fmjax.methods.radar.settings import AUTO, CHOICES

    fixed = {f: v for f, v in chosen["setting"].items() if f not in CHOICES}
    values = []
    for result in results:
        rows = [r for r in result["rows"] if all(r[f] == v for f, v in fixed.items())]
        for pick, read in (("A", "B"), ("B", "A")):
            best = max(rows, key=lambda r: (round(_fold_criterion(r, pick), 3), r["t_score"], -r["sobel_smooth_sigma"]))
            values.append(_fold_criterion(best, read))
    per_run = float(np.mean(values))
    setting = chosen["setting"]
    if round(per_run, 3) > round(chosen["criterion"], 3):
        setting = {**setting, **{f: AUTO for f in CHOICES}}
    return {**chosen, "setting": setting, "per_run": per_run}


REPORTS = {"texture": "radar", "aligned": "radar_aligned"}  # OUT/<name>.md and .json per kind


def write_report(chosen: dict, results: list[dict], out: str, kind: str = "texture") -> None:
    from fmjax.methods.radar.settings import PRESETS, Settings

    fields = scored_fields(results, kind)
    default = PRESETS.get(kind, Settings())
    paper = (250, 0.0) + tuple(PAPER_SIDE[f] for f in fields[2:])
    agrees = all(getattr(default, f) == v for f, v in chosen["setting"].items())
    per_run = chosen.get("per_run")
    criterion = ("mean over textures and the two folds of (image AUROC + pixel AUROC) / 2, on held-out normal "
                 "training crops and self-supervised defects made from them" if kind == "texture" else
                 "mean over the one-class sets and the two folds of the image AUROC of held-out normal training "
                 "images against training images of the other classes")
    lines = [f"# RADAR scoring settings chosen on validation data ({kind})", "", f"Command: `{command_line()}`", "",
             f"Criterion: {criterion}.", "",
             "Chosen: " + ", ".join(f"{f}={v}" for f, v in chosen["setting"].items())
             + (f" (the best single setting's criterion {chosen['criterion']:.3f}; t_score and the blur chosen per "
                f"set on one fold and read on the other: {per_run:.3f})" if per_run is not None else
                f" (criterion {chosen['criterion']:.3f})")
             + f"; fmjax's {'default' if kind == 'texture' else kind + ' preset'}"
             + f" {'agrees' if agrees else 'DIFFERS'}.", "",
             "| " + " | ".join(fields) + " | criterion | " + " | ".join(
                 f"{r['set']} image / pixel" for r in results) + " |",
             "|---" * (len(fields) + 1) + "|" + "---|" * len(results)]
    for key, value in sorted(chosen["mean"].items()):
        mark = ((" (chosen)" if per_run is None else " (best single)") if key == chosen["best"] else
                " (paper)" if key == paper else "")
        cells = [f"{r['image_auroc']:.3f} / " + ("-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}")
                 for r in chosen["table"][key]]
        lines.append(f"| {key[0]}{mark} | " + " | ".join(str(v) for v in key[1:]) + f" | {value:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Seconds per set: " + ", ".join(f"{r['set']} {r['seconds']:.0f}" for r in results)]
    with open(os.path.join(out, REPORTS[kind] + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, REPORTS[kind] + ".json"), "w") as f:
        json.dump({"setting": chosen["setting"], "criterion": chosen["criterion"], "per_run_criterion": per_run,
                   "default_agrees": agrees,
                   "mean": [dict(zip(fields, k), criterion=v) for k, v in chosen["mean"].items()],
                   "sets": [r["set"] for r in results]}, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the RADAR runs, one per set (default: OUT/radar_runs)")
    p.add_argument("--textures", default="brick,grass,gravel", help="embedded textures")
    p.add_argument("--aligned", default="", help="one-class sets: fashion_mnist:C or digits:D, comma-separated "
                   "(their choice is the `aligned` preset's)")
    p.add_argument("--repeats", type=int, default=3, help="defects per held-out normal (textures)")
    p.add_argument("--others", type=int, default=300, help="other-class training images per one-class set")
    p.add_argument("--resume", action="store_true", help="keep the sets already in OUT/radar_<set>.json")
    p.add_argument("--fix", default="", help="field=value,...: hold grid fields at one value (e.g. a second stage "
                   "at the first stage's choice)")
    args = p.parse_args()
    from fmjax.app import launch

    launch.start()
    args.runs = args.runs or os.path.join(args.out, "radar_runs")
    os.makedirs(args.out, exist_ok=True)
    for kind, items in (("texture", args.textures), ("aligned", args.aligned)):
        if items:
            grid_of(kind, args.fix)  # a bad --fix stops before any work
        results = [validation_set(item, kind, args) for item in filter(None, items.split(","))]
        if results:
            chosen = choose(results, kind)
            write_report(with_per_run_choice(chosen, results) if kind == "texture" else chosen, results, args.out, kind)


if __name__ == "__main__":
    main()
