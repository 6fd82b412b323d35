"""Flow Mismatching against RADAR, flow reconstruction and two non-learned floors (PCA,
patch nearest neighbour), on the same data with the same metrics and their cost.

Command:
    python experiments/compare_methods.py [--textures brick,grass,gravel] [--preset auto]
        [--set KEY=VALUE ...] [--out experiments/results/compare_methods] [--methods pca,patch_nn]
    python experiments/compare_methods.py --textures "" --fashion-mnist 0 --test-limit 1000

Per embedded texture (real photos, synthetic defects on held-out crops):
  flow_mismatch  one flow-matching model, Flow Mismatching scores (K*T parallel calls)
  recon          the SAME model scored by ODE reconstruction (N sequential calls), so the
                 pair isolates the scoring rule
  radar          an epsilon U-Net on patches, one noising step, Sobel maps, Isolation
                 Forest fitted on the held-out normals (never trained on)
  pca            a floor: sklearn PCA fitted on the normal training images, map = squared
                 residual summed over channels, image score max_plus_top1
  patch_nn       a floor: raw-pixel patch nearest neighbour (fmjax.baselines.PatchNN): a
                 bank of --bank-size random --patch-size patches of the normal training
                 images, each test patch's exact distance to its nearest bank patch, a
                 pixel's value the mean over the patches covering it, image score = max
All go through fmjax.app.train / fmjax.app.evaluate (the CLI's training, calibration and
scoring path); thresholds come from held-out normal images only (radar: its forest's
decision). Each image AUROC carries DeLong's 95% interval, and every learned method is
compared with each floor (and Flow Mismatching with the other learned methods) on the same
test images by DeLong's paired test (fmjax.eval.intervals): OUT/compare_methods.md's second
table; the image scores behind it are kept in OUT/scores/<dataset>.npz.
Writes OUT/compare_methods.{md,csv,json} (one row per texture and method, plus the mean
over textures) and the run folders OUT/runs/<texture>/<method>; a rerun reuses every
finished run that trained the same network (other scoring settings, e.g. new defaults,
are fitted again on its held-out normals).  --set overrides (train.*, net.*, ...) go to every method;
score.* keys are each method's own, so scoring overrides are better given to evaluate.
One-class Fashion-MNIST (--fashion-mnist CLASSES): train on one class's training images
(auto: the aligned preset at 32x32, as experiments/fashion_mnist_oneclass.py), test on
the 10,000 test images or, with --test-limit N, on a class-stratified random subset of N of them (fixed seed, so
every method sees the same images); image metrics only (the images carry no masks).
Expected run time on a 2-core CPU with the default preset auto (texture for the three
textures: two trainings of 1,200 steps, flow matching and RADAR, then scoring: Flow
Mismatching about 1.5 images/s at K*T = 64, reconstruction about 10, RADAR about 45,
PCA hundreds): 2,824 s for all three on a machine shared with other jobs.
--preset tiny --textures brick takes about a minute.  Finished runs are reused.
--methods picks a subset (e.g. --methods pca,patch_nn: the floors alone, no training).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

NAMES = {"flow_mismatch": "Flow Mismatching", "radar": "RADAR", "recon": "flow reconstruction",
         "pca": "PCA floor", "patch_nn": "patch nearest neighbour"}
NETWORKS = ("flow_mismatch", "radar", "recon")
COLUMNS = ["dataset", "method", "image_auroc", "image_auroc_ci95", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
           "pixel_f1_max", "aupro", "image_f1_at_threshold", "network_calls_per_image",
           "sequential_calls_per_image", "images_per_s", "train_s"]


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--textures", default="brick,grass,gravel", help="comma-separated (default: all three)")
    p.add_argument("--fashion-mnist", default="", metavar="CLASSES",
                   help="comma-separated Fashion-MNIST classes (ids or names) to compare on as well")
    p.add_argument("--test-limit", type=int, default=0,
                   help="Fashion-MNIST: score a class-stratified subset of this many test images (default: all)")
    p.add_argument("--preset", default="auto",
                   help="auto (default: what fmjax train picks per data set) or a preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, every method; a score.* override goes to each method whose scoring "
                        "settings have that field")
    p.add_argument("--out", default=os.path.join("experiments", "results", "compare_methods"))
    p.add_argument("--pca-components", type=float, default=0.9,
                   help="PCA: fraction of variance kept if < 1, else the number of components (default 0.9)")
    p.add_argument("--patch-size", type=int, default=7, help="patch nearest neighbour: patch side (default 7)")
    p.add_argument("--bank-size", type=int, default=16384,
                   help="patch nearest neighbour: patches in the memory bank (default 16384)")
    p.add_argument("--methods", default=",".join(NAMES),
                   help=f"comma-separated subset of {', '.join(NAMES)} (default: all; recon needs flow_mismatch)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _same_training(saved, wanted) -> bool:
    """saved: a run's config (channels and auto flips resolved from the data); wanted: the
    requested one. Equal but for the scoring settings: the same trained network."""
    flips = {k: getattr(saved.train, k) for k in ("hflip", "vflip") if getattr(wanted.train, k) is None}
    return saved.replace(score=wanted.score) == wanted.replace(
        data=dataclasses.replace(wanted.data, channels=saved.data.channels),
        train=dataclasses.replace(wanted.train, **flips))


def split_score_overrides(overrides, methods) -> tuple[list, list]:
    """(the overrides of every method, the score.* ones), checked: a score field that none
    of the learned `methods` has stops with one line."""
    from fmjax.methods import registry

    score = [o for o in overrides if o.split("=", 1)[0].strip().startswith("score.")]
    fields = {f.name for m in methods if m in registry.names() for f in dataclasses.fields(registry.settings_for(m, "small"))}
    for item in score:
        if item.split("=", 1)[0].strip()[len("score."):] not in fields:
            raise SystemExit(f"compare_methods: --set {item}: no method of {', '.join(methods)} has that setting")
    return [o for o in overrides if o not in score], score


def method_config(base, method: str, score_overrides):
    """`base` for `method` (its scoring settings for base's preset) with the score.*
    overrides whose field that method's settings have."""
    from fmjax.config import apply_overrides, with_method

    config = with_method(base, method)
    fields = {f.name for f in dataclasses.fields(config.score)}
    return apply_overrides(config, [o for o in score_overrides
                                    if o.split("=", 1)[0].strip()[len("score."):] in fields])


def _finished(run_dir, config):
    """The Run and its training seconds if run_dir holds a finished run that trained the
    network `config` trains, else None. Other scoring settings are applied to the Run
    (`runs.load_run` fits them again on the held-out normals; the folder is unchanged)."""
    from fmjax import runs

    timing = os.path.join(run_dir, "timing.json")
    if not os.path.exists(timing):
        return None
    run = runs.load_run(run_dir)
    if not _same_training(run.config, config):
        return None
    wanted = dataclasses.asdict(config.score)
    changed = [f"score.{k}={v}" for k, v in wanted.items() if dataclasses.asdict(run.config.score)[k] != v]
    if changed:
        run = runs.load_run(run_dir, changed)
    return run, json.load(open(timing))["train_s"]


def train_or_reuse(config, spec, run_dir, progress, source=None, reuse=True, label=""):
    """(Run, training seconds, reused).  source: a flow run folder to re-score (recon)
    instead of training; reuse=False rebuilds even a finished run."""
    from fmjax.app.train import rescore_run, train_run
    from fmjax.files import write_json

    found = _finished(run_dir, config) if reuse else None
    if found:
        print(f"   reusing {run_dir}" + (f" ({found[0].refit})" if found[0].refit else ""), flush=True)
        return found + (True,)
    if label:
        print(f"   {label}: training ({config.train.steps} steps)", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or stale run of this script
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    start = time.perf_counter()
    if source is None:
        run = train_run(config, spec, None, run_dir, progress=progress)
        train_s = time.perf_counter() - start
    else:
        run = rescore_run(source, run_dir, config.method)
        train_s = 0.0  # no training of its own: the flow model's
    write_json(os.path.join(run_dir, "timing.json"), {"train_s": train_s})
    return run, train_s, False


FASHION_MNIST_SETTINGS = ["data.image_size=32", "calibration.holdout_fraction=0.02"]


def evaluate(run, dataset):
    """evaluate_run after one warm-up call, so images_per_s excludes compilation: (its
    metrics, the image scores float64 [N] in test order as `--scores-out` exports them;
    on data without defect masks no maps are computed)."""
    from fmjax.app.evaluate import evaluate_run, has_defect_pixels
    from fmjax.files import plain_name
    from fmjax.methods.batches import scoring_progress

    (run.score if has_defect_pixels(dataset.test) else run.image_scores)(dataset.test.images[:1])
    with tempfile.TemporaryDirectory() as tmp, scoring_progress(f"scoring {dataset.category}", sys.stderr.isatty()):
        result = evaluate_run(run, dataset, scores_out=tmp)
        scores_csv = os.path.join(tmp, plain_name(dataset.category, "category"), "image_scores.csv")
        with open(scores_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    if [int(r["label"]) for r in rows] != [int(x) for x in dataset.test.labels]:
        raise RuntimeError(f"{scores_csv}: the exported image scores are not in test order")
    return result, np.array([float(r["score"]) for r in rows])


FLOORS = ("pca", "patch_nn")


def paired_tests(dataset_name: str, scores: dict, labels) -> list[dict]:
    """DeLong's paired test of image AUROCs on one test split: every learned method against
    each floor, and Flow Mismatching against RADAR and the reconstruction. scores: {method:
    float [N]} on the same images; labels {0, 1} [N]."""
    from fmjax.eval.intervals import auroc_difference

    learned = [m for m in NETWORKS if m in scores]
    pairs = [(m, f) for m in learned for f in FLOORS if f in scores]
    pairs += [("flow_mismatch", m) for m in ("radar", "recon") if "flow_mismatch" in scores and m in scores]
    return [{"dataset": dataset_name, "a": a, "b": b, **auroc_difference(scores[a], scores[b], labels)}
            for a, b in pairs]


def floor(dataset, config, model):
    """A non-learned floor (fmjax.baselines) fitted on the normal training images the
    networks train on (the held-out ones left out), thresholds from the held-out normals,
    metrics as for the runs. Returns (metrics, image scores float64 [N])."""
    from fmjax import data as data_lib
    from fmjax.app.evaluate import split_metrics
    from fmjax.eval.calibration import thresholds

    cal_config = config.calibration
    fit, holdout = data_lib.split_holdout(dataset.train, cal_config.holdout_fraction, cal_config.seed,
                                         cal_config.min_holdout)
    start = time.perf_counter()
    model.fit(fit.images)
    train_s = time.perf_counter() - start
    cal = thresholds(cal_config, *model.score(holdout.images)) if holdout is not None else {}
    model.score(dataset.test.images[:1])  # warm-up: compiles for this image shape
    start = time.perf_counter()
    maps, scores = model.score(dataset.test.images)
    seconds = time.perf_counter() - start
    threshold = cal.get("image_threshold")
    decided = None if threshold is None else (scores >= threshold).astype(np.int32)
    result = split_metrics(dataset.test, maps, scores, decided, threshold, cal.get("pixel_threshold"))
    result.update({"network_calls_per_image": 0, "sequential_calls_per_image": 0, "train_s": train_s,
                   "images_per_s": len(dataset.test) / max(seconds, 1e-9)})
    return result, np.asarray(scores, np.float64)


def main(argv=None):
    args = _parser().parse_args(argv)
    from fmjax.app import launch

    launch.start()  # before jax is imported
    import jax

    from fmjax import baselines, data as data_lib
    from fmjax.app.train import resolve_auto
    from fmjax.config import AUTO, build
    from fmjax.data import fashion_mnist, textures
    from fmjax.eval.viz import markdown_table
    from fmjax.files import write_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in NAMES]
    if unknown or ("recon" in methods and "flow_mismatch" not in methods):
        raise SystemExit(f"compare_methods: --methods takes {', '.join(NAMES)} (recon with flow_mismatch), "
                         f"got {args.methods!r}")
    common, score_sets = split_score_overrides(args.set, methods)
    names = [n.strip() for n in args.textures.split(",") if n.strip()]
    for name in names:
        if name not in textures.TEXTURES:
            raise SystemExit(f"compare_methods: unknown texture {name!r} (known: {', '.join(textures.TEXTURES)})")
    datasets = [(name, f"textures:{name}", []) for name in names]
    for cls in filter(None, (c.strip() for c in args.fashion_mnist.split(","))):
        try:
            label = f"fmnist-{fashion_mnist.CLASSES[fashion_mnist.class_index(cls)]}"
        except ValueError as err:
            raise SystemExit(f"compare_methods: {err}") from None
        datasets.append((label, f"fashion_mnist:{fashion_mnist.class_index(cls)}", FASHION_MNIST_SETTINGS))
    if not datasets:
        raise SystemExit("compare_methods: nothing to compare (give --textures and/or --fashion-mnist)")
    os.makedirs(args.out, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.out, ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    wall = time.perf_counter()
    rows, configs, tests = [], {}, []
    for name, spec, settings in datasets:
        if args.preset == AUTO:  # as fmjax train: texture or aligned, from the training images
            base, _, reason = resolve_auto(spec, None, "flow_mismatch", common)
        else:
            base, reason = build(args.preset, "flow_mismatch", settings + common), args.preset
        configs[name] = json.loads(method_config(base, "flow_mismatch", score_sets).to_json())
        root = os.path.join(args.out, "runs", name)
        print(f"== {name} (preset {reason})", flush=True)
        progress = not args.no_progress
        trained = {}
        if "flow_mismatch" in methods:
            trained["flow_mismatch"] = train_or_reuse(method_config(base, "flow_mismatch", score_sets), spec,
                                                      os.path.join(root, "flow_mismatch"), progress,
                                                      label="flow matching")
        if "recon" in methods:
            # a flow model trained just now invalidates an older re-scored copy
            trained["recon"] = train_or_reuse(method_config(base, "recon", score_sets), spec, os.path.join(root, "recon"),
                                              progress,
                                              source=os.path.join(root, "flow_mismatch"),
                                              reuse=trained["flow_mismatch"][2])
        if "radar" in methods:
            trained["radar"] = train_or_reuse(method_config(base, "radar", score_sets), spec, os.path.join(root, "radar"),
                                              progress,
                                              label="radar")
        data_config = next(iter(trained.values()))[0].config if trained else base
        dataset = data_lib.load(spec, None, data_config.data, data_config.textures)
        if spec.startswith("fashion_mnist:"):
            dataset = dataclasses.replace(dataset, test=data_lib.stratified_subset(dataset.test, args.test_limit))
        results, scores = {}, {}
        for method, (run, train_s, _) in trained.items():
            results[method], scores[method] = evaluate(run, dataset)
            results[method]["train_s"] = train_s
        if "recon" in results:
            results["recon"]["train_s"] = results["flow_mismatch"]["train_s"]  # the same model
        if "pca" in methods:
            pca = baselines.PCAFloor(args.pca_components)
            results["pca"], scores["pca"] = floor(dataset, data_config, pca)
            results["pca"]["pca_components"] = int(pca.pca.n_components_)
        if "patch_nn" in methods:
            results["patch_nn"], scores["patch_nn"] = floor(dataset, data_config,
                                                            baselines.PatchNN(args.patch_size, args.bank_size))
        os.makedirs(os.path.join(args.out, "scores"), exist_ok=True)
        np.savez_compressed(os.path.join(args.out, "scores", f"{name}.npz"), labels=dataset.test.labels.astype(np.int8),
                            **{m: s.astype(np.float32) for m, s in scores.items()})
        tests += paired_tests(name, scores, dataset.test.labels)
        for method in methods:
            row = {"dataset": name, "method": method, **results[method]}
            rows.append(row)
            print(f"   {NAMES[method]:<24} image AUROC {row['image_auroc']:.3f}  pixel AUROC "
                  f"{row['pixel_auroc']:.3f}  AUPRO {row['aupro']:.3f}  {row['images_per_s']:.1f} img/s", flush=True)
    if len(names) > 1:
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["dataset"] in names]
            rows.append({"dataset": "texture mean", "method": method,
                         **{c: float(np.mean([r[c] for r in mine])) for c in COLUMNS[2:]
                            if all(isinstance(r[c], (int, float)) for r in mine)}})
    seconds = time.perf_counter() - wall
    display = [dict(r, method=NAMES[r["method"]]) for r in rows]
    table = markdown_table(display, COLUMNS)
    title = (f"Methods on {', '.join(d[0] for d in datasets)} (preset {args.preset}"
             + (f", {args.test_limit} Fashion-MNIST test images" if args.test_limit and len(datasets) > len(names) else "")
             + (f", {' '.join(args.set)}" if args.set else "") + f"; {len(jax.devices())} CPU devices)")
    paired = markdown_table([dict(t, a=NAMES[t["a"]], b=NAMES[t["b"]], interval=[t["low"], t["high"]])
                             for t in tests], ["dataset", "a", "b", "difference", "interval", "p_value"])
    print(f"\n{title}\n{table}\n\nImage AUROC of a minus b, DeLong's paired test\n{paired}\nwall time {seconds:.0f} s")
    with open(os.path.join(args.out, "compare_methods.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n\nimage_auroc_ci95: DeLong's 95% interval. image_f1_at_threshold: threshold "
                f"from held-out normals (RADAR: the Isolation Forest's decision). Wall time {seconds:.0f} s.\n\n"
                f"Image AUROC of a minus b on the same test images, DeLong's paired test (95% interval, two-sided "
                f"p-value):\n\n{paired}\n")
    with open(os.path.join(args.out, "compare_methods.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(os.path.join(args.out, "compare_methods.json"),
                    {"preset": args.preset, "overrides": args.set, "datasets": [d[0] for d in datasets], "test_limit": args.test_limit,
                     "configs": configs, "wall_s": seconds, "rows": rows, "paired_tests": tests})
    print(f"-> {os.path.join(args.out, 'compare_methods.md')} (.csv, .json)")


if __name__ == "__main__":
    from fmjax.errors import FmjaxError, first_line

    try:
        main()
    except FmjaxError as err:
        sys.exit(f"compare_methods: error: {first_line(err)}")
