"""The validation protocol that chooses the `texture` and `aligned` presets' scoring rules.

No test split is read. For each validation set the run is trained with what `auto`
resolves to (experiments reuse a run folder when its config is the same), and its
held-out normal training images are cut in two halves: A fits the normalisation
statistics, B are the validation normals. Validation anomalies:
  aligned sets (one-class): training images of the OTHER classes (image AUROC);
  texture sets: B with self-supervised defects (fmjax/data/synthetic.py),
    three per image (mean of image and pixel AUROC).
Every rule of a grid (paths K, path aggregate, smoothing, normalisation x map rule,
the feature map's weight, image score) is read from the same stored mismatch of A, B and
the anomalies and the same feature maps (score.feature_map: the encoder's features per
position against a bank of the images the network trained on; their scale fitted on A;
the image score `features`: the network's own features against a bank of those images,
score.feature_knn = FEATURE_KNN); the rule
with the best mean criterion over the sets of a kind is chosen (criteria within 0.001:
the wider median separation of anomaly and normal image scores).

    python experiments/select_settings.py --out experiments/results/selection \
        --aligned fashion_mnist:0,digits:0,digits:1 --textures brick,grass,gravel

Writes OUT/<set>.json (every rule's validation figures) and OUT/selection.{json,md} (the
choice per kind, why, the ablation from the paper's rule, and whether the presets in
fmjax/methods/flow_mismatch/settings.py agree).
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
from fmjax.data.synthetic import anomaly_set  # noqa: E402
from table import command_line  # noqa: E402

PAPER = {"aggregate": "rank:2", "smooth_sigma": 0.0, "normalize": "none", "map_rule": "weighted",
         "feature_map": 0.0, "image_score": "max_plus_top1"}
GRID = {"num_paths": (4, 8), "aggregate": ("rank:2", "mean"), "smooth_sigma": (0.0, 1.0, 2.0, 3.0, 4.0),
        "rule": (("none", "weighted"), ("global", "weighted"), ("global", "two_sided"), ("global", "combined"),
                 ("pixel", "weighted"), ("pixel", "two_sided"), ("pixel", "combined")),
        "feature_map": (0.0, 0.5, 1.0), "image_score": ("max_plus_top1", "mean", "features")}
RULE_FIELDS = ("num_paths", "aggregate", "smooth_sigma", "normalize", "map_rule", "feature_map", "image_score")
# rows of sets scored before a field was in the grid were scored with its default
FIELD_DEFAULTS = {"feature_map": 0.0}
FEATURE_KNN = 5  # neighbours of the `features` image score (score.feature_knn)


def rule_of(settings) -> dict:
    """A Flow Mismatching Settings as a grid rule (image_score `features` when feature_knn > 0)."""
    rule = {f: getattr(settings, f) for f in RULE_FIELDS}
    if settings.feature_knn:  # another k is not the rule the grid scored
        rule["image_score"] = "features" if settings.feature_knn == FEATURE_KNN else f"features:{settings.feature_knn}"
    return rule


def digits_folder(root: str, digit: int) -> str:
    """scikit-learn's bundled 8x8 digits as a one-class folder (ROOT/digit_<d>/train/good):
    an aligned validation set that needs no download. Returns the folder spec."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)
    for split, picked in (("train", images[bunch.target == digit]), ("test", images[bunch.target == digit][:1])):
        folder = os.path.join(root, f"digit_{digit}", split, "good")
        os.makedirs(folder, exist_ok=True)
        for i, x in enumerate(picked):
            Image.fromarray(x).save(os.path.join(folder, f"{i:04d}.png"))
    return f"folder:{root}"


def other_class_images(spec: str, size: int, limit: int, seed: int) -> np.ndarray:
    """uint8 [limit, S, S, 1]: training images of the other classes of a one-class set."""
    rng = np.random.default_rng(seed)
    if spec.startswith("fashion_mnist:"):
        from fmjax.data import fashion_mnist

        images, labels = fashion_mnist._read_pair(fashion_mnist.resolve_dir(), "train")
        own = fashion_mnist.class_index(spec.split(":", 1)[1])
        picked = rng.permutation(np.nonzero(labels != own)[0])[:limit]
        return fashion_mnist.to_working_size(images[picked], size)
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    own = int(spec.split(":", 1)[1])
    picked = rng.permutation(np.nonzero(bunch.target != own)[0])[:limit]
    out = [np.asarray(Image.fromarray(np.clip(np.rint(x * (255 / 16)), 0, 255).astype(np.uint8))
                      .resize((size, size), Image.BILINEAR)) for x in bunch.images[picked]]
    return np.stack(out)[..., None]


def trained_run(name: str, spec: str, category, runs_dir: str, overrides=()):
    """(run, normal training Split, kind) of the `auto` config for this data; trains when
    the run folder is missing, reuses it when its config is the same."""
    from fmjax import runs
    from fmjax.app.train import resolve_auto, train_run

    config, data, reason = resolve_auto(spec, category, overrides=overrides)
    run_dir = os.path.join(runs_dir, name)
    if os.path.isdir(run_dir):
        run = runs.load_run(run_dir)
        saved = run.config.train
        # what shapes the network and the images it trained on (the textures' layout and so the
        # hold-out): logging and checkpoints do not, auto flips (None) match what they chose
        trained = lambda c: (c.method, c.net, c.data.image_size, c.textures, c.calibration, dataclasses.replace(
            c.train, log_every=1, checkpoint_every=1, keep_checkpoints=1,
            hflip=saved.hflip if c.train.hflip is None else c.train.hflip,
            vflip=saved.vflip if c.train.vflip is None else c.train.vflip))
        if trained(run.config) != trained(config):
            raise SystemExit(f"{run_dir} was trained with another config: move it away")
    else:
        print(f"{name}: training ({reason}) ...", flush=True)
        run = train_run(config, spec, category, run_dir, progress=False, data=data)
    return run, data[0], reason.split()[0]


def stored_mismatch(run, sets: dict, num_paths: int, num_times: int, seed: int = 0) -> dict:
    """{name: float32 delta [N, T, K, H, W]} of each image set, one scorer for all (its
    paths drawn from `seed`)."""
    from fmjax.methods.flow_mismatch.scorer import Scorer
    from fmjax.methods.flow_mismatch.settings import Settings
    from fmjax.nets import unet

    _, apply_fn = unet.build_model(run.config.net, run.image_shape)
    settings = Settings(num_paths=num_paths, num_times=num_times, chunk_size=64, image_batch=2, seed=seed)
    scorer = Scorer(apply_fn, settings, run.image_shape)
    out = {name: np.asarray(scorer.delta(run.params, images), np.float32) for name, images in sets.items()}
    return out, np.asarray(scorer.times)


def feature_scores(run, trained, sets: dict, knn: int = FEATURE_KNN, feature_grid: int = 0,
                   feature_whiten: bool = False) -> dict:
    """{name: float32 [N]} the `features` image score (score.feature_knn = knn, in the form
    feature_grid, feature_whiten: this stage's is the plain per-channel form; the second
    stage, select_features.py, scores the others) of each image set {name: uint8 [N, H, W, C]},
    the bank drawn from `trained` (the Split the network trained on) as the run's fit
    draws it; no maps are scored."""
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch.method import feature_bank

    config = run.config.replace(score=dataclasses.replace(run.config.score, feature_knn=knn, feature_grid=feature_grid,
                                                             feature_whiten=feature_whiten))
    probe = dataclasses.replace(run, config=config, _scorer=None)
    bank = feature_bank(probe, trained)
    return {name: np.asarray(feat.knn_scores(probe.scorer.features(run.params, images), bank, knn))
            for name, images in sets.items()}


def feature_maps(run, trained, sets: dict) -> dict:
    """{name: float32 [N, H, W]} the unsmoothed feature maps (score.feature_map) of each
    image set {name: uint8 [N, H, W, C]}, the bank drawn from `trained` (the Split the
    network trained on) as the run's fit draws it."""
    from fmjax.methods.flow_mismatch.method import patch_bank

    config = run.config.replace(score=dataclasses.replace(run.config.score, feature_map=1.0, smooth_sigma=0.0))
    probe = dataclasses.replace(run, config=config, _scorer=None)
    bank = patch_bank(probe, trained)
    return {name: probe.scorer.feature_maps(run.params, images, patches=bank) for name, images in sets.items()}


def rule_rows(delta: dict, times, masks, pixel_level: bool, feature_scores: dict | None = None,
              feature_maps: dict | None = None) -> list[dict]:
    """Validation figures of every rule in GRID from the stored mismatch of A (statistics),
    B (normals) and V (anomalies, `masks` uint8 [M, H, W]); the image score `features`
    from `feature_scores`, the feature map from the unsmoothed `feature_maps` of A, B and
    V (without them, they are left out)."""
    import jax.numpy as jnp

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import heat_maps, per_time_maps, time_weights
    from fmjax.methods.maps import gaussian_smooth, image_score

    weights = time_weights(jnp.asarray(times), "t2")
    labels = np.r_[np.zeros(len(delta["B"])), np.ones(len(delta["V"]))]
    mixes = GRID["feature_map"] if feature_maps is not None else (0.0,)
    rows = []
    for k, aggregate, sigma, (normalize, rule) in itertools.product(
            GRID["num_paths"], GRID["aggregate"], GRID["smooth_sigma"], GRID["rule"]):
        sliced = {n: jnp.asarray(d[:, :, :k]) for n, d in delta.items()}
        stats = None
        if normalize != "none":
            stats = norm.fit_stats(per_time_maps(sliced["A"], aggregate, sigma), weights, normalize)
        parts = {n: np.asarray(heat_maps(sliced[n], jnp.asarray(times), aggregate, "t2", sigma, normalize, rule,
                                         stats)) for n in ("A", "B", "V") if n != "A" or feature_maps is not None}
        if feature_maps is not None:
            smooth = {n: np.asarray(gaussian_smooth(jnp.asarray(f), sigma)) for n, f in feature_maps.items()}
            scale = feat.map_scale(parts["A"], smooth["A"])
        for mix in mixes:
            maps = np.concatenate([parts[n] if not mix else np.asarray(
                feat.combine_maps(parts[n], smooth[n], scale, mix)) for n in ("B", "V")])
            pixel = {}
            if pixel_level:
                all_masks = np.concatenate([np.zeros((len(delta["B"]),) + masks.shape[1:], np.uint8), masks])
                pixel = {"pixel_auroc": metrics.pixel_metrics(maps, all_masks)["pixel_auroc"]}
            for spec in GRID["image_score"]:
                if spec == "features":
                    if feature_scores is None:
                        continue
                    scores = np.concatenate([feature_scores["B"], feature_scores["V"]])
                else:
                    scores = np.asarray(image_score(jnp.asarray(maps), spec))
                normal, anomalous = scores[labels == 0], scores[labels == 1]
                row = {"num_paths": k, "aggregate": aggregate, "smooth_sigma": sigma, "normalize": normalize,
                       "map_rule": rule, "feature_map": mix, "image_score": spec,
                       "image_auroc": metrics.image_metrics(scores, labels)["image_auroc"], **pixel,
                       "separation": float((np.median(anomalous) - np.median(normal)) / (normal.std() + 1e-12))}
                row["criterion"] = float(np.mean([row["image_auroc"]] + list(pixel.values())))
                rows.append(row)
    return rows


def validation_data(name: str, spec: str, category, kind_wanted: str, args):
    """Trains (or reuses) the run and builds its validation images: (run, sets {A, B, V}
    uint8 [N, H, W, C], masks uint8 [M, H, W] of V or None, kind, reason, the training
    images but the held-out ones)."""
    from fmjax import data as data_lib

    overrides = list(args.set)
    if kind_wanted == "texture" and args.texture_steps:
        overrides.append(f"train.steps={args.texture_steps}")
    run, train, reason = trained_run(name, spec, category, args.runs, overrides)
    kind = reason
    cal = run.config.calibration
    trained, holdout = data_lib.split_holdout(train, cal.holdout_fraction, cal.seed)
    a, b = data_lib.split_halves(holdout)
    sets = {"A": a.images, "B": b.images}
    masks = None
    if kind == "aligned":
        sets["V"] = other_class_images(spec if spec.startswith("fashion") else f"digits:{category.split('_')[1]}",
                                       run.config.data.image_size, args.others, seed=1)
    else:
        repeated = np.concatenate([sets["B"]] * args.repeats)
        sets["V"], masks = anomaly_set(repeated, sets["A"], seed=2)
    return run, sets, masks, kind, reason, trained


def validation_set(name: str, spec: str, category, kind_wanted: str, args) -> dict:
    """Trains (or reuses) the run, stores the mismatch of A, B and the anomalies, scores
    every rule. Returns {"rows", "kind", "reason", "sizes", "seconds"}."""
    path = os.path.join(args.out, f"{name}.json")
    if args.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.perf_counter()
    run, sets, masks, kind, reason, trained = validation_data(name, spec, category, kind_wanted, args)
    delta, times = stored_mismatch(run, sets, max(GRID["num_paths"]), args.num_times)
    rows = rule_rows(delta, times, masks, pixel_level=kind == "texture",
                     feature_scores=feature_scores(run, trained, {n: sets[n] for n in ("B", "V")}),
                     feature_maps=feature_maps(run, trained, sets))
    result = {"set": name, "kind": kind, "expected_kind": kind_wanted, "reason": reason,
              "sizes": {n: len(x) for n, x in sets.items()}, "seconds": time.perf_counter() - start, "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def stored_set(name: str, path: str, args) -> dict:
    """An aligned set from a stored mismatch (npz with A, B, V float [N, T, K, H, W] and
    times [T], written by an earlier run of this protocol with the aligned preset's model):
    the rules are scored here as for a trained run."""
    out = os.path.join(args.out, f"{name}.json")
    if args.resume and os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    start = time.perf_counter()
    with np.load(path) as stored:
        delta = {k: stored[k].astype(np.float32) for k in "ABV"}
        times = stored["times"]
    rows = rule_rows(delta, times, None, pixel_level=False)
    result = {"set": name, "kind": "aligned", "expected_kind": "aligned", "reason": f"stored mismatch {os.path.basename(path)}",
              "sizes": {n: len(x) for n, x in delta.items()}, "seconds": time.perf_counter() - start, "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def choose(results: list[dict]) -> dict:
    """Per kind: the rule with the best mean criterion over that kind's sets, the ablation
    (the paper's rule, then one change at a time towards the choice) and the criterion of
    the preset's rule today (what a training ablation compares)."""
    from fmjax.methods.flow_mismatch.settings import PRESETS

    chosen = {}
    for kind in ("aligned", "texture"):
        sets = [r for r in results if r["kind"] == kind]
        if not sets:
            continue
        key = lambda row: tuple(row.get(f, FIELD_DEFAULTS.get(f)) for f in RULE_FIELDS)
        table, separation = {}, {}
        for result in sets:
            for row in result["rows"]:
                table.setdefault(key(row), []).append(row["criterion"])
                separation.setdefault(key(row), []).append(row.get("separation", 0.0))
        mean = {k: float(np.mean(v)) for k, v in table.items() if len(v) == len(sets)}
        # ties (criteria equal to 0.001, e.g. a saturated set) go to the wider separation of the
        # image scores: median anomaly minus median normal, in normal standard deviations
        rank = lambda k: (round(mean[k], 3), float(np.mean(separation[k])))
        # the map's rule first, from the rules that score images by their map; then the
        # `features` image score with that map if it is better (its image scores are the
        # same under every map rule, so it cannot choose the map)
        best = max((k for k in mean if k[-1] != "features"), key=rank)
        with_features = best[:-1] + ("features",)
        if with_features in mean and round(mean[with_features], 3) > round(mean[best], 3):
            best = with_features
        best_rule = dict(zip(RULE_FIELDS, best))
        paper = dict(PAPER, num_paths=best_rule["num_paths"])
        ablation = [("paper rule", mean[tuple(paper[f] for f in RULE_FIELDS)])]
        for field in ("aggregate", "smooth_sigma", ("normalize", "map_rule"), "feature_map", "image_score"):
            fields = field if isinstance(field, tuple) else (field,)
            one = dict(paper, **{f: best_rule[f] for f in fields})
            ablation.append((" + ".join(f"{f}={best_rule[f]}" for f in fields) + " alone",
                             mean[tuple(one[f] for f in RULE_FIELDS)]))
        ablation.append(("all (the choice)", mean[best]))
        preset_rule = rule_of(PRESETS[kind])
        preset_key = tuple(preset_rule[f] for f in RULE_FIELDS)
        chosen[kind] = {"rule": best_rule, "criterion": mean[best], "sets": [r["set"] for r in sets],
                        "preset_criterion": mean.get(preset_key, float("nan")),
                        "per_set": {r["set"]: next(row for row in r["rows"] if key(row) == best) for r in sets},
                        "ablation": ablation, "runner_up": sorted(mean.items(), key=lambda kv: -kv[1])[1:4]}
    return chosen


def write_report(chosen: dict, results: list[dict], out: str) -> None:
    from fmjax.methods.flow_mismatch.settings import PRESETS

    lines = ["# Scoring rules chosen on validation data", "", f"Command: `{command_line()}`", ""]
    for kind, c in chosen.items():
        agrees = rule_of(PRESETS[kind]) == c["rule"]
        c["preset_agrees"] = agrees
        lines += [f"## {kind} ({', '.join(c['sets'])})", "",
                  "Chosen: " + ", ".join(f"{f}={v}" for f, v in c["rule"].items()) +
                  f" (mean criterion {c['criterion']:.3f}); preset `{kind}` "
                  f"{'agrees' if agrees else 'DIFFERS'} (its rule: {c['preset_criterion']:.3f}).", "",
                  "| change | mean criterion |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in c["ablation"]]
        lines += ["", "| set | " + " | ".join(k for k in ("image_auroc", "pixel_auroc") if k in
                                              next(iter(c["per_set"].values()))) + " |", "|---|---|---|"]
        for name, row in c["per_set"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in ("image_auroc", "pixel_auroc")
                                                      if k in row) + " |")
        lines.append("")
    lines.append("Seconds per set: " + ", ".join(f"{r['set']} {r['seconds']:.0f}" for r in results))
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "selection.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    print("\n".join(lines))


def texture_study_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a study over the protocol's texture runs (learned_map.py,
    expected_mismatch.py): --out, --runs, --textures, --texture-steps, --repeats."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the protocol's trained runs (default: OUT/runs)")
    p.add_argument("--textures", default="brick,grass,gravel")
    p.add_argument("--texture-steps", type=int, default=0, help="as for select_settings.py")
    p.add_argument("--repeats", type=int, default=3, help="defects per validation normal")
    return p


def run_texture_study(args, texture_rows) -> dict:
    """Starts JAX and reads every texture of args.textures: {name: texture_rows(name, args)}
    (`validation_data` reads args as this script's own)."""
    from fmjax.app import launch

    launch.start()
    args.runs = args.runs or os.path.join(args.out, "runs")
    args.set, args.others = [], 0
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in filter(None, args.textures.split(",")):
        start = time.time()
        results[name] = texture_rows(name, args)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the trained runs (default: OUT/runs)")
    p.add_argument("--aligned", default="fashion_mnist:0,digits:0,digits:1",
                   help="one-class sets: fashion_mnist:C or digits:D (scikit-learn's bundled digits)")
    p.add_argument("--textures", default="brick,grass,gravel", help="embedded textures")
    p.add_argument("--num-times", type=int, default=8)
    p.add_argument("--others", type=int, default=300, help="other-class images per aligned set")
    p.add_argument("--repeats", type=int, default=3, help="defects per validation normal (textures)")
    p.add_argument("--stored", action="append", default=[], metavar="NAME=NPZ",
                   help="an aligned set from a stored mismatch (A, B, V, times) of the aligned preset's model")
    p.add_argument("--texture-steps", type=int, default=0,
                   help="training steps of the texture runs (default: the preset's; 600 reuses `fmjax demo` runs)")
    p.add_argument("--resume", action="store_true", help="keep the sets already in OUT/<set>.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. train.lr_schedule=cosine): a training ablation "
                        "on the validation protocol; use another --out and --runs")
    args = p.parse_args()
    from fmjax.app import launch

    launch.start()
    args.runs = args.runs or os.path.join(args.out, "runs")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for item in filter(None, args.aligned.split(",")):
        source, _, value = item.partition(":")
        if source == "digits":
            spec, category = digits_folder(os.path.join(args.out, "digits"), int(value)), f"digit_{value}"
            results.append(validation_set(f"digits_{value}", spec, category, "aligned", args))
        else:
            results.append(validation_set(f"fashion_mnist_{value}", item, None, "aligned", args))
    for item in args.stored:
        name, _, path = item.partition("=")
        results.append(stored_set(name, path, args))
    for name in filter(None, args.textures.split(",")):
        results.append(validation_set(name, f"textures:{name}", None, "texture", args))
    write_report(choose(results), results, args.out)


if __name__ == "__main__":
    main()
