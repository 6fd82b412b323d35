"""A run directory and what is done with it: train, calibrate, evaluate, predict.

RUN/config.json     the full Config (channels resolved from the data)
RUN/data.json       the data spec and category it was trained on
RUN/checkpoints/    orbax checkpoints (params, EMA params, optimizer state, step)
RUN/train_log.jsonl one line per logged step
RUN/calibration.json thresholds fitted on held-out normal training images only
RUN/metrics.json    written by evaluate
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from fmjax import data as data_lib
from fmjax import metrics as metrics_lib
from fmjax import viz
from fmjax.config import Config
from fmjax.data import DataError


class RunError(RuntimeError):
    """A run directory that cannot be used (missing, incomplete, from another config)."""


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    from fmjax.train import write_json_atomic

    write_json_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


@contextlib.contextmanager
def staged_dir(path: str):
    """Yields a temp folder next to `path`; on success its files are moved into `path`,
    on failure it is removed, so `path` never holds half-written output."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fmjax-", dir=parent)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            dest_root = os.path.join(path, os.path.relpath(root, tmp))
            os.makedirs(dest_root, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(dest_root, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_channels(config: Config, dataset) -> Config:
    """Fixes config.data.channels to the channel count the data actually has."""
    channels = dataset.train.images.shape[-1]
    return config.replace(data=dataclasses.replace(config.data, channels=int(channels)))


# ----------------------------------------------------------------------------- train

def train_run(config: Config, spec: str, category: str | None, run_dir: str, resume: bool = False,
              progress: bool = True, devices=None):
    """Reads the data, trains, and fits thresholds on held-out normals. Returns the Run."""
    from fmjax import train as train_lib

    dataset = data_lib.load(spec, category, config.data)
    config = resolve_channels(config, dataset)
    fit, holdout = data_lib.split_holdout(dataset.train, config.data.holdout_fraction, config.data.seed)
    data_path = os.path.join(run_dir, "data.json")
    data_info = {"spec": spec, "category": dataset.category}
    if resume and os.path.exists(data_path) and json.load(open(data_path)) != data_info:
        raise RunError(f"--resume: {data_path} says {json.load(open(data_path))}, not {data_info}")
    train_lib.train(config, fit.images, run_dir, labels=fit.labels, resume=resume, progress=progress,
                    devices=devices)
    write_json(data_path, data_info)
    run = load_run(run_dir)
    if holdout is not None:
        maps, scores = run.score(holdout.images)
        write_json(os.path.join(run_dir, "calibration.json"), calibration(config, maps, scores))
        run = load_run(run_dir)
    return run


def calibration(config: Config, normal_maps: np.ndarray, normal_scores: np.ndarray) -> dict:
    """Thresholds from held-out NORMAL images only (never from test labels)."""
    sc = config.score
    pixel_threshold = float(np.quantile(normal_maps, sc.pixel_threshold_quantile))
    return {"image_threshold": metrics_lib.threshold_from_normals(normal_scores, sc.image_threshold_quantile),
            "pixel_threshold": pixel_threshold,
            "display_max": 2.0 * pixel_threshold,
            "num_normal_images": int(len(normal_scores))}


# ----------------------------------------------------------------------------- load

@dataclasses.dataclass
class Run:
    path: str
    config: Config
    data_info: dict
    params: object
    calibration: dict
    _scorer: object = None

    @property
    def image_shape(self):
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    @property
    def scorer(self):
        if self._scorer is None:
            from fmjax import mismatch, train as train_lib

            _, apply_fn = train_lib.build_model(self.config, self.image_shape)
            self._scorer = mismatch.Scorer(apply_fn, self.config.score, self.image_shape)
        return self._scorer

    def score(self, images, labels=None):
        """uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N])."""
        return self.scorer.score(self.params, images, labels)


def load_run(run_dir: str, score_overrides=None) -> Run:
    """Restores a trained run (EMA params by default) ready to score."""
    from fmjax import train as train_lib
    from fmjax.config import apply_overrides

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist: train first (fmjax train --out {run_dir})")
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} is missing: {run_dir} is not a finished fmjax run")
    config = apply_overrides(Config.from_json(open(config_path).read()), score_overrides)
    data_path = os.path.join(run_dir, "data.json")
    data_info = json.load(open(data_path)) if os.path.exists(data_path) else {}
    cal_path = os.path.join(run_dir, "calibration.json")
    cal = json.load(open(cal_path)) if os.path.exists(cal_path) else {}
    d = config.data
    state = train_lib.restore_state(run_dir, config, (d.image_size, d.image_size, d.channels))
    params = state.ema_params if config.score.use_ema else state.params
    return Run(run_dir, config, data_info, params, cal)


# ----------------------------------------------------------------------------- evaluate

def full_size_maps(split, maps):
    """Maps resized bilinearly to each image's original size (list of [H_i, W_i])."""
    return [viz.resize_map(m, tuple(size)) for m, size in zip(maps, split.original_sizes)]


def evaluate_run(run: Run, dataset, maps_out: str | None = None, pictures_out: str | None = None) -> dict:
    """Scores the test split; returns (and writes RUN/metrics.json) every metric.

    Pixel metrics use the masks at original size when the reader kept them (maps are
    resized bilinearly up to them), else the working-resolution masks.
    """
    test = dataset.test
    if test.images.shape[1:] != run.image_shape:
        raise DataError(f"test images are {test.images.shape[1:]} but the run expects {run.image_shape}")
    start = time.perf_counter()
    maps, scores = run.score(test.images)
    seconds = time.perf_counter() - start
    if test.full_masks is not None:
        eval_maps, eval_masks = full_size_maps(test, maps), test.full_masks
    else:
        eval_maps, eval_masks = maps, test.masks
    result = metrics_lib.compute_all(scores, test.labels, eval_maps, eval_masks)
    cal = run.calibration
    if "image_threshold" in cal:
        at = metrics_lib.thresholded_metrics(scores, test.labels, cal["image_threshold"])
        result.update({f"image_{k}_at_threshold": v for k, v in at.items()})
        result["image_threshold"] = cal["image_threshold"]
    if "pixel_threshold" in cal and test.labels.any():
        flat_maps = np.concatenate([np.ravel(m) for m in eval_maps])
        flat_masks = np.concatenate([np.ravel(m) for m in eval_masks])
        at = metrics_lib.thresholded_metrics(flat_maps, flat_masks, cal["pixel_threshold"])
        result["pixel_f1_at_threshold"] = at["f1"]
        result["pixel_threshold"] = cal["pixel_threshold"]
    result.update({"category": dataset.category, "method": run.config.method, "num_test_images": len(test),
                   "score_seconds": seconds, "images_per_s": len(test) / max(seconds, 1e-9)})
    write_json(os.path.join(run.path, "metrics.json"), result)
    if maps_out:
        write_maps(maps_out, dataset.category, test, maps)
    if pictures_out:
        write_pictures(pictures_out, test, maps, scores, display_max(run, maps))
    return result


def display_max(run: Run, maps) -> float:
    """Upper end of the colour scale: from held-out normals when calibrated."""
    return run.calibration.get("display_max") or float(np.quantile(maps, 0.999))


def write_maps(out_dir: str, category: str, split, maps) -> None:
    """float32 TIFF maps at each image's original size: OUT/<category>/<name>.tiff
    (names are test/<defect>/<id>: the layout of MVTec's official evaluation)."""
    import tifffile

    with staged_dir(out_dir) as tmp:
        for name, m in zip(split.names, full_size_maps(split, maps)):
            path = os.path.join(tmp, category, name + ".tiff")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tifffile.imwrite(path, np.asarray(m, np.float32))


def write_pictures(out_dir: str, split, maps, scores, vmax: float, limit: int = 24) -> None:
    """Panels (image | overlay | map | mask) for up to `limit` test images, anomalous first."""
    order = np.argsort(-split.labels, kind="stable")[:limit]
    with staged_dir(out_dir) as tmp:
        tiles = []
        for i in order:
            tile = viz.panel(split.images[i], maps[i], vmax, split.masks[i])
            tiles.append(tile)
            viz.save_png(os.path.join(tmp, split.names[i].replace("/", "_") + ".png"), tile)
        viz.save_png(os.path.join(tmp, "overview.png"), viz.grid(tiles, 2))


# ----------------------------------------------------------------------------- predict

def predict(run: Run, input_path: str, out_dir: str) -> list[dict]:
    """Scores image files; writes OUT/scores.csv, OUT/overlays/*.png, OUT/maps/*.tiff."""
    import tifffile

    from fmjax.data import folder

    d = run.config.data
    images, names, sizes = folder.load_images(input_path, d.image_size, d.channels)
    maps, scores = run.score(images)
    threshold = run.calibration.get("image_threshold")
    vmax = display_max(run, maps)
    rows = []
    with staged_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, "overlays"))
        os.makedirs(os.path.join(tmp, "maps"))
        for image, name, size, m, s in zip(images, names, sizes, maps, scores):
            stem = os.path.splitext(name)[0].replace("/", "_")
            full = viz.resize_map(m, tuple(size))
            tifffile.imwrite(os.path.join(tmp, "maps", stem + ".tiff"), full.astype(np.float32))
            viz.save_png(os.path.join(tmp, "overlays", stem + ".png"), viz.overlay(image, m, vmax))
            rows.append({"image": name, "score": float(s),
                         "anomalous": "" if threshold is None else int(s >= threshold),
                         "threshold": "" if threshold is None else threshold})
        with open(os.path.join(tmp, "scores.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "score", "anomalous", "threshold"])
            writer.writeheader()
            writer.writerows(rows)
    return rows
