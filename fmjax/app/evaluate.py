"""`fmjax evaluate`: score a test split with a trained run, compute every metric, write
RUN/metrics.json and optionally TIFF maps with the image scores, the image scores alone,
and pictures."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from fmjax import data as data_lib
from fmjax import runs
from fmjax.errors import DataError, RunError, warn
from fmjax.eval import intervals
from fmjax.eval import metrics as metrics_lib
from fmjax.eval import writers
from fmjax.files import Outputs, plain_name

__all__ = ["COLUMNS", "display_max", "evaluate_all", "evaluate_run", "has_defect_pixels", "main", "metrics_name",
           "metrics_table", "split_metrics"]

COLUMNS = ["category", "image_auroc", "image_auroc_ci95", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "radar_f1",
           "network_calls_per_image", "seconds"]


def split_metrics(split, maps, scores, decided=None, image_threshold=None, pixel_threshold=None) -> dict:
    """Every metric of maps float [N,H,W] (None: the pixel metrics are nan) and image
    scores float [N] on a labelled split.

    Threshold-free: image/pixel AUROC, AP, F1-max and AUPRO (pixel metrics on the masks at
    original size when the reader kept them, maps resized bilinearly up to them), and
    image_auroc_ci95 = [low, high], DeLong's 95% interval of the image AUROC.
    Thresholded: image_{precision,recall,f1,accuracy}_at_threshold of `decided` (int [N],
    1 = anomalous: a method's own decision) and pixel F1 at `pixel_threshold`.
    """
    if maps is None:
        eval_maps = eval_masks = None
    elif split.full_masks is not None:
        eval_maps, eval_masks = writers.full_size_maps(split, maps), split.full_masks
    else:
        eval_maps, eval_masks = maps, split.masks
    result = metrics_lib.compute_all(scores, split.labels, eval_maps, eval_masks)
    result["image_auroc_ci95"] = list(intervals.auroc_interval(scores, split.labels))
    if decided is not None:
        # 0/1 decisions as scores with threshold 1: the metrics of the decision itself
        at = metrics_lib.thresholded_metrics(np.asarray(decided, np.float32), split.labels, 1.0)
        result.update({f"image_{k}_at_threshold": v for k, v in at.items()})
    if image_threshold is not None:
        result["image_threshold"] = image_threshold
    if pixel_threshold is not None and split.labels.any():
        result["pixel_f1_at_threshold"] = math.nan  # of defect pixels: none marked, or no maps
        if eval_maps is not None and has_defect_pixels(split):
            flat_maps = np.concatenate([np.ravel(m) for m in eval_maps])
            flat_masks = np.concatenate([np.ravel(m) for m in eval_masks])
            result["pixel_f1_at_threshold"] = metrics_lib.thresholded_metrics(flat_maps, flat_masks,
                                                                             pixel_threshold)["f1"]
        result["pixel_threshold"] = pixel_threshold
    return result


def has_defect_pixels(split) -> bool:
    """Whether any mask of `split` marks a defect pixel (what the pixel metrics need)."""
    if split.full_masks is not None:
        return any(np.any(m) for m in split.full_masks)
    return bool(np.any(split.masks))


def display_max(run: runs.Run, maps) -> float:
    """Upper end of the heat maps' colour scale: from held-out normals when calibrated."""
    return run.calibration.get("display_max") or float(np.quantile(maps, 0.999))


def evaluate_run(run: runs.Run, dataset, maps_out: str | None = None, pictures_out: str | None = None,
                 class_id: int = 0, write_metrics: bool = True, metrics_file: str = runs.METRICS,
                 scores_out: str | None = None) -> dict:
    """Scores the test split; returns (and writes RUN/`metrics_file`) every metric.

    Standard keys for every method (see split_metrics), network_calls_per_image and
    sequential_calls_per_image, and the method's own (RADAR: radar_{accuracy,precision,
    recall,f1} at the forest's decision). `scores_out` gets
    <category>/image_scores.csv alone, as `maps_out` holds it beside the maps (and, on
    data without defect masks, without computing the maps). The maps, the scores, the
    pictures and metrics.json are published together once all are written, metrics.json
    last; an existing `maps_out`, `scores_out` or `pictures_out` is replaced, never merged
    into (`fmjax.files.Outputs`).
    """
    with Outputs() as out:
        maps_dir, pictures_dir = out.folder(maps_out, "--maps-out"), out.folder(pictures_out, "--pictures-out")
        scores_dir = out.folder(scores_out, "--scores-out")
        result = _evaluate(run, dataset, maps_dir, pictures_dir, class_id, scores_dir)
        if write_metrics:
            out.json(os.path.join(run.path, metrics_file), result)
    return result


def _evaluate(run: runs.Run, dataset, maps_dir, pictures_dir, class_id: int, scores_dir=None) -> dict:
    test = dataset.test
    if test.images.shape[1:] != run.image_shape:
        raise DataError(f"test images are {test.images.shape[1:]} but the run expects {run.image_shape}")
    if len(test) and not test.labels.any():
        warn(f"category {dataset.category}: all {len(test)} test images are normal: the image and pixel AUROC, AP "
             f"and AUPRO need anomalous ones, so they are nan (maps and image scores are written as usual)")
    elif len(test) and test.labels.all():
        warn(f"category {dataset.category}: all {len(test)} test images are anomalous: the image AUROC and AP need "
             f"normal ones, so they are nan (the pixel metrics compare defect and normal pixels)")
    class_ids = np.full(len(test), class_id, np.int32)
    start = time.perf_counter()
    # without defect masks and exports nothing reads the maps: the scorer may skip them
    with_maps = bool(maps_dir or pictures_dir) or has_defect_pixels(test)
    maps, scores = run.score(test.images, class_ids) if with_maps else (None, run.image_scores(test.images, class_ids))
    seconds = time.perf_counter() - start
    cal = run.calibration
    decided = run.decide(scores)
    result = split_metrics(test, maps, scores, decided, cal.get("image_threshold"), cal.get("pixel_threshold"))
    if decided is not None:
        result.update(run.method.metrics(test.labels, decided))
    result.update(run.cost(maps=with_maps))
    result.update({"category": dataset.category, "method": run.config.method, "num_test_images": len(test),
                   "score_seconds": seconds, "images_per_s": len(test) / max(seconds, 1e-9), "maps_scored": with_maps})
    if maps_dir:
        writers.write_maps(maps_dir, dataset.category, test, maps, scores, decided)
    if scores_dir:
        writers.write_image_scores(scores_dir, dataset.category, test, scores, decided)
    if pictures_dir:
        writers.write_pictures(pictures_dir, test, maps, scores, display_max(run, maps),
                               threshold=cal.get("image_threshold"))
    return result


def evaluate_all(run: runs.Run, spec: str, maps_out: str | None = None, pictures_out: str | None = None,
                 metrics_file: str = runs.METRICS, scores_out: str | None = None) -> dict:
    """A unified (`--category all`) run on every category it was trained on: per-category
    rows and their mean; RUN/`metrics_file` holds the mean keys plus `per_category`. Every
    category's maps, scores and pictures are published together with it, as in
    `evaluate_run`."""
    categories = run.data_info.get("categories") or data_lib.categories_of(spec)
    rows = []
    with Outputs() as out:
        maps_dir, pictures_dir = out.folder(maps_out, "--maps-out"), out.folder(pictures_out, "--pictures-out")
        scores_dir = out.folder(scores_out, "--scores-out")
        for dataset in data_lib.load_all(spec, run.config.data, categories):
            pictures = os.path.join(pictures_dir, plain_name(dataset.category, "category")) if pictures_dir else None
            rows.append(_evaluate(run, dataset, maps_dir, pictures, run.class_id(dataset.category), scores_dir))
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k, v in rows[0].items()
                if isinstance(v, float) and all(isinstance(r.get(k), float) for r in rows)}
        result = {**mean, "category": "mean", "method": run.config.method, "per_category": rows}
        out.json(os.path.join(run.path, metrics_file), result)
    return result


def metrics_table(rows) -> str:
    from fmjax.eval.viz import markdown_table

    return markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])


def metrics_name(run: runs.Run, spec: str, category: str | None, overrides=()) -> str:
    """RUN/metrics.json for the run's own data at its own settings; for other data or other
    scoring settings, metrics-<category or data name>-<8 hex digits of what differs>.json,
    so the run's own metrics are never overwritten."""
    own = spec == run.data_info.get("spec") and category in (None, run.data_info.get("category"))
    if own and not overrides:
        return runs.METRICS
    what = json.dumps([spec, category, sorted(overrides or ())])
    label = category or data_lib.parse_spec(spec)[1]
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(str(label).rstrip("/\\")))
    return f"metrics-{label or 'data'}-{hashlib.sha256(what.encode()).hexdigest()[:8]}.json"


def main(args) -> None:
    from fmjax.eval.events import EventLog
    from fmjax.methods.batches import scoring_progress

    log = EventLog(args.logdir) if args.logdir else None  # a missing tensorboardX stops before any work
    with runs.lock(args.run, "evaluate"):
        run = runs.load_run(args.run, args.set)
        if run.refit:
            print(f"fmjax evaluate: note: {run.refit}", file=sys.stderr)
        spec = args.data or run.data_info.get("spec")
        if not spec:
            raise RunError(f"{args.run}/data.json is missing: pass --data")
        # the run's category by default, also on other data in the same layout
        category = args.category or run.data_info.get("category")
        if spec.startswith(("textures:", "fashion_mnist:")):
            category = None
        name = metrics_name(run, spec, category, args.set)
        with scoring_progress("scoring", not args.no_progress and sys.stderr.isatty()):
            if category == "all":
                result = evaluate_all(run, spec, maps_out=args.maps_out, pictures_out=args.pictures_out,
                                      metrics_file=name, scores_out=args.scores_out)
                print(metrics_table(result["per_category"] + [result]))
            else:
                class_id = run.class_id(category)
                dataset = data_lib.load(spec, category, run.config.data, run.config.textures)
                result = evaluate_run(run, dataset, maps_out=args.maps_out, pictures_out=args.pictures_out,
                                      class_id=class_id, metrics_file=name, scores_out=args.scores_out)
                print(metrics_table([result]))
    if log is not None:
        with log:
            log.scalars(f"eval/{result.get('category') or category or 'data'}", result, run.config.train.steps)
    print(f"metrics -> {os.path.join(args.run, name)}")
