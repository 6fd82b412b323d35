"""A run directory and what is done with it: train, calibrate, evaluate, predict.

RUN/config.json     the full Config (channels resolved from the data)
RUN/data.json       the data spec and category it was trained on
RUN/checkpoints/    orbax checkpoints (params, EMA params, optimizer state, step)
RUN/train_log.jsonl one line per logged step
RUN/calibration.json thresholds fitted on held-out normal training images only
RUN/radar_forest.pkl method radar: the Isolation Forest fitted on normal training images
RUN/metrics.json    written by evaluate

Every method (config.method: flow_mismatch, radar, recon) is scored through `Run.score`,
so evaluate, predict and the experiments share one scoring path per method.
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


def resolve_flips(config: Config, spec: str, categories) -> Config:
    """Settles train.hflip / train.vflip left at None (auto) from the data: on for
    orientation-free data (fmjax.data.orientation_free), off otherwise."""
    free = data_lib.orientation_free(spec, categories)
    tc = config.train
    return config.replace(train=dataclasses.replace(tc, hflip=free if tc.hflip is None else tc.hflip,
                                                    vflip=free if tc.vflip is None else tc.vflip))


# ----------------------------------------------------------------------------- train

def train_run(config: Config, spec: str, category: str | None, run_dir: str, resume: bool = False,
              progress: bool = True, devices=None, use_pmap: bool = False):
    """Reads the data, trains, and fits thresholds on held-out normals. Returns the Run.

    flow_mismatch and recon train the same flow-matching model (they differ in scoring);
    radar trains the epsilon network on patches, then fits its Isolation Forest on the
    features of the normal training images (fit and held-out split) -> RUN/radar_forest.pkl.
    """
    from fmjax import train as train_lib

    if category == "all":
        # one unified model; train labels are category indices (used when net.num_classes > 0)
        datasets = data_lib.load_all(spec, config.data)
        if config.net.num_classes not in (0, len(datasets)):
            raise RunError(f"--category all found {len(datasets)} categories: set net.num_classes to 0 "
                           f"(one unconditional model) or {len(datasets)} (class-conditional)")
        dataset = data_lib.Dataset(datasets[0].name, "all", data_lib.unified_train(datasets), datasets[0].test)
        data_info = {"spec": spec, "category": "all", "categories": [d.category for d in datasets]}
    else:
        dataset = data_lib.load(spec, category, config.data)
        data_info = {"spec": spec, "category": dataset.category}
    config = resolve_flips(resolve_channels(config, dataset), spec,
                           data_info.get("categories", [dataset.category]))
    fit, holdout = data_lib.split_holdout(dataset.train, config.data.holdout_fraction, config.data.seed)
    data_path = os.path.join(run_dir, "data.json")
    if resume and os.path.exists(data_path) and json.load(open(data_path)) != data_info:
        raise RunError(f"--resume: {data_path} says {json.load(open(data_path))}, not {data_info}")
    if config.method == "radar":
        import jax

        from fmjax import radar

        radar.train_radar(config, config.radar, fit.images, run_dir=run_dir, resume=resume, progress=progress,
                          devices=devices if devices is not None else jax.local_devices())
    else:
        train_lib.train(config, fit.images, run_dir, labels=fit.labels, resume=resume, progress=progress,
                        devices=devices, use_pmap=use_pmap)
    write_json(data_path, data_info)
    run = load_run(run_dir)
    if config.method == "radar":
        from fmjax import radar

        run.forest = run.fit_forest(dataset.train.images)
        radar.save_forest(os.path.join(run_dir, FOREST_FILE), run.forest)
    return _calibrate(run, holdout)


def _calibrate(run: "Run", holdout) -> "Run":
    """Writes RUN/calibration.json from the held-out normals (none: no calibration)."""
    if holdout is None:
        return run
    maps, scores = run.score(holdout.images, holdout.labels)  # labels: class ids (zeros unless unified)
    write_json(os.path.join(run.path, "calibration.json"), calibration(run.config, maps, scores))
    return load_run(run.path)


def rescore_run(src_dir: str, dst_dir: str, method: str, overrides=()) -> "Run":
    """A new run folder scoring the flow-matching model of `src_dir` with another rule
    (flow_mismatch <-> recon): checkpoints and data.json copied, config.json with `method`
    and the scoring `overrides`, thresholds fitted again on the same held-out normals."""
    from fmjax.config import apply_overrides
    from fmjax.train import write_json_atomic

    src = load_run(src_dir)
    flow_methods = ("flow_mismatch", "recon")
    if src.config.method not in flow_methods or method not in flow_methods:
        raise RunError(f"rescore_run: {src_dir} is a {src.config.method} run; only {' and '.join(flow_methods)} "
                       f"share a model")
    if os.path.exists(dst_dir):
        raise RunError(f"{dst_dir} already exists: choose a new folder")
    config = apply_overrides(src.config, [f"method={method}", *overrides])
    os.makedirs(os.path.dirname(os.path.abspath(dst_dir)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fmjax-", dir=os.path.dirname(os.path.abspath(dst_dir)))
    try:
        shutil.copytree(os.path.join(src_dir, "checkpoints"), os.path.join(tmp, "checkpoints"))
        write_json(os.path.join(tmp, "data.json"), src.data_info)
        write_json_atomic(os.path.join(tmp, "config.json"), config.to_json())
        os.replace(tmp, dst_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dataset = data_lib.load(src.data_info["spec"], src.data_info.get("category"), config.data)
    _, holdout = data_lib.split_holdout(dataset.train, config.data.holdout_fraction, config.data.seed)
    return _calibrate(load_run(dst_dir), holdout)


def calibration(config: Config, normal_maps: np.ndarray, normal_scores: np.ndarray) -> dict:
    """Thresholds from held-out NORMAL images only (never from test labels), at the
    score.*_threshold_quantile settings.  radar's image decision is its Isolation Forest
    (anomalous where the score -decision_function is > 0), so its image threshold is 0."""
    sc = config.score
    pixel_threshold = float(np.quantile(normal_maps, sc.pixel_threshold_quantile))
    result = {"image_threshold": metrics_lib.threshold_from_normals(normal_scores, sc.image_threshold_quantile),
              "pixel_threshold": pixel_threshold,
              "display_max": 2.0 * pixel_threshold,
              "num_normal_images": int(len(normal_scores))}
    if config.method == "radar":
        result.update(image_threshold=0.0, image_decision="isolation_forest")
    return result


# ----------------------------------------------------------------------------- load

FOREST_FILE = "radar_forest.pkl"
# radar settings that change neither features nor forest (anything else does)
_RADAR_NEUTRAL = ("image_batch",)


def scoring_section(config: Config):
    """The config section that sets how `config.method` scores: score, radar or recon."""
    return {"flow_mismatch": config.score, "radar": config.radar, "recon": config.recon}[config.method]


@dataclasses.dataclass
class Run:
    path: str
    config: Config
    data_info: dict
    params: object
    calibration: dict
    forest: object = None  # radar: the Isolation Forest over the two image features
    refit_forest: bool = False  # radar: scoring overrides changed the features, fit again on load
    _scorer: object = None

    @property
    def image_shape(self):
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    @property
    def scorer(self):
        """The method's jitted scorer (built once per Run)."""
        if self._scorer is None:
            from fmjax import train as train_lib

            _, apply_fn = train_lib.build_model(self.config, self.image_shape)
            method = self.config.method
            if method == "radar":
                from fmjax import radar

                self._scorer = radar.RadarScorer(apply_fn, self.config.radar, self.image_shape)
            elif method == "recon":
                from fmjax import recon

                self._scorer = recon.ReconScorer(apply_fn, self.config.recon, self.image_shape)
            else:
                from fmjax import mismatch

                self._scorer = mismatch.Scorer(apply_fn, self.config.score, self.image_shape)
        return self._scorer

    def score(self, images, labels=None):
        """uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]), higher = more anomalous.

        flow_mismatch: mismatch maps; recon: reconstruction error maps; radar: Sobel maps
        of the noise map, score = -decision_function of the Isolation Forest.
        """
        if self.config.method != "radar":
            return self.scorer.score(self.params, images, labels)
        from fmjax import radar

        maps, feats = self.scorer.score(self.params, images, labels)
        _, scores = radar.forest_predict(self._forest(), feats)
        return maps, scores

    def decide(self, scores) -> np.ndarray | None:
        """Predicted labels int32 [N] (1 = anomalous) for scores from `score`, or None when
        the run has no decision.  radar: the forest's own (score > 0 exactly where
        forest.predict says -1); others: score >= the calibrated image threshold."""
        scores = np.asarray(scores)
        if self.config.method == "radar":
            return (scores > 0).astype(np.int32)
        threshold = self.calibration.get("image_threshold")
        return None if threshold is None else (scores >= threshold).astype(np.int32)

    def features(self, images, labels=None) -> np.ndarray:
        """radar only: the two image features float32 [N, 2] the forest classifies."""
        if self.config.method != "radar":
            raise RunError(f"{self.path} is a {self.config.method} run: image features exist for radar runs only")
        return self.scorer.score(self.params, images, labels)[1]

    def fit_forest(self, normal_images):
        """radar: an Isolation Forest fitted on the features of NORMAL images uint8 [N,H,W,C]."""
        from fmjax import radar

        return radar.fit_forest(self.features(normal_images), self.config.radar)

    def _forest(self):
        if self.forest is None:
            if not self.refit_forest:
                raise RunError(f"{os.path.join(self.path, FOREST_FILE)} is missing: the radar run did not finish; "
                               f"train it again")
            # scoring overrides changed the features: fit again on the run's normal training images
            spec, category = self.data_info.get("spec"), self.data_info.get("category")
            if not spec:
                raise RunError(f"{self.path}/data.json is missing: cannot refit the forest for these radar settings")
            dataset = data_lib.load(spec, None if spec.startswith("textures:") else category, self.config.data)
            self.forest = self.fit_forest(dataset.train.images)
        return self.forest

    def cost(self) -> dict:
        """Network evaluations per image, all of them and those that must run one after another."""
        from fmjax import recon

        section = scoring_section(self.config)
        return {"network_calls_per_image": recon.network_calls_per_image(section, self.image_shape),
                "sequential_calls_per_image": recon.sequential_calls_per_image(section)}


def load_run(run_dir: str, score_overrides=None) -> Run:
    """Restores a trained run (EMA params by default) ready to score.

    score_overrides: scoring settings for this Run only (["score.num_paths=32", ...]).
    A radar override that changes the features refits the forest on the normal training
    images (the stored one stays as it is).
    """
    from fmjax import train as train_lib
    from fmjax.config import apply_overrides

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist: train first (fmjax train --out {run_dir})")
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} is missing: {run_dir} is not a finished fmjax run")
    saved = Config.from_json(open(config_path).read())
    config = apply_overrides(saved, score_overrides)
    data_path = os.path.join(run_dir, "data.json")
    data_info = json.load(open(data_path)) if os.path.exists(data_path) else {}
    cal_path = os.path.join(run_dir, "calibration.json")
    cal = json.load(open(cal_path)) if os.path.exists(cal_path) else {}
    d = config.data
    state = train_lib.restore_state(run_dir, config, (d.image_size, d.image_size, d.channels))
    params = state.ema_params if scoring_section(config).use_ema else state.params
    run = Run(run_dir, config, data_info, params, cal)
    if config.method == "radar":
        from fmjax import radar

        neutral = {name: 0 for name in _RADAR_NEUTRAL}
        if dataclasses.replace(config.radar, **neutral) != dataclasses.replace(saved.radar, **neutral):
            run.refit_forest = True
        elif os.path.exists(os.path.join(run_dir, FOREST_FILE)):
            run.forest = radar.load_forest(os.path.join(run_dir, FOREST_FILE))
    return run


# ----------------------------------------------------------------------------- evaluate

def full_size_maps(split, maps):
    """Maps resized bilinearly to each image's original size (list of [H_i, W_i])."""
    return [viz.resize_map(m, tuple(size)) for m, size in zip(maps, split.original_sizes)]


def split_metrics(split, maps, scores, decided=None, image_threshold=None, pixel_threshold=None) -> dict:
    """Every metric of maps float [N,H,W] and image scores float [N] on a labelled split.

    Threshold-free: image/pixel AUROC, AP, F1-max and AUPRO (pixel metrics on the masks at
    original size when the reader kept them, maps resized bilinearly up to them).
    Thresholded: image_{precision,recall,f1,accuracy}_at_threshold of `decided` (int [N],
    1 = anomalous: a method's own decision) and pixel F1 at `pixel_threshold`.
    """
    if split.full_masks is not None:
        eval_maps, eval_masks = full_size_maps(split, maps), split.full_masks
    else:
        eval_maps, eval_masks = maps, split.masks
    result = metrics_lib.compute_all(scores, split.labels, eval_maps, eval_masks)
    if decided is not None:
        # 0/1 decisions as scores with threshold 1: the metrics of the decision itself
        at = metrics_lib.thresholded_metrics(np.asarray(decided, np.float32), split.labels, 1.0)
        result.update({f"image_{k}_at_threshold": v for k, v in at.items()})
    if image_threshold is not None:
        result["image_threshold"] = image_threshold
    if pixel_threshold is not None and split.labels.any():
        flat_maps = np.concatenate([np.ravel(m) for m in eval_maps])
        flat_masks = np.concatenate([np.ravel(m) for m in eval_masks])
        at = metrics_lib.thresholded_metrics(flat_maps, flat_masks, pixel_threshold)
        result["pixel_f1_at_threshold"] = at["f1"]
        result["pixel_threshold"] = pixel_threshold
    return result


def evaluate_all(run: Run, spec: str, maps_out: str | None = None, pictures_out: str | None = None) -> dict:
    """A unified (`--category all`) run on every category it was trained on: per-category
    rows and their mean; RUN/metrics.json holds the mean keys plus `per_category`."""
    categories = run.data_info.get("categories") or data_lib.categories_of(spec)
    rows = []
    for class_id, dataset in enumerate(data_lib.load_all(spec, run.config.data, categories)):
        pictures = os.path.join(pictures_out, dataset.category) if pictures_out else None
        rows.append(evaluate_run(run, dataset, maps_out, pictures, class_id=class_id, write_metrics=False))
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k, v in rows[0].items()
            if isinstance(v, float) and all(isinstance(r.get(k), float) for r in rows)}
    result = {**mean, "category": "mean", "method": run.config.method, "per_category": rows}
    write_json(os.path.join(run.path, "metrics.json"), result)
    return result


def evaluate_run(run: Run, dataset, maps_out: str | None = None, pictures_out: str | None = None,
                 class_id: int = 0, write_metrics: bool = True) -> dict:
    """Scores the test split; returns (and writes RUN/metrics.json) every metric.

    Standard keys for every method (see split_metrics), network_calls_per_image and
    sequential_calls_per_image; radar adds radar_{accuracy,precision,recall,f1} at the
    forest's decision (equal to its image_*_at_threshold).
    """
    test = dataset.test
    if test.images.shape[1:] != run.image_shape:
        raise DataError(f"test images are {test.images.shape[1:]} but the run expects {run.image_shape}")
    start = time.perf_counter()
    maps, scores = run.score(test.images, np.full(len(test), class_id, np.int32))
    seconds = time.perf_counter() - start
    cal = run.calibration
    decided = run.decide(scores)
    result = split_metrics(test, maps, scores, decided, cal.get("image_threshold"), cal.get("pixel_threshold"))
    if run.config.method == "radar":
        from fmjax import radar

        result.update({f"radar_{k}": v for k, v in radar.radar_metrics(test.labels, decided).items()})
        result["image_threshold"] = 0.0
    result.update(run.cost())
    result.update({"category": dataset.category, "method": run.config.method, "num_test_images": len(test),
                   "score_seconds": seconds, "images_per_s": len(test) / max(seconds, 1e-9)})
    if write_metrics:
        write_json(os.path.join(run.path, "metrics.json"), result)
    if maps_out:
        write_maps(maps_out, dataset.category, test, maps, scores, decided)
    if pictures_out:
        write_pictures(pictures_out, test, maps, scores, display_max(run, maps))
    return result


def display_max(run: Run, maps) -> float:
    """Upper end of the colour scale: from held-out normals when calibrated."""
    return run.calibration.get("display_max") or float(np.quantile(maps, 0.999))


def write_maps(out_dir: str, category: str, split, maps, scores, decided=None) -> None:
    """float32 TIFF maps at each image's original size, OUT/<category>/<name>.tiff (names
    are test/<defect>/<id>: the layout of MVTec's official evaluation), and the image
    scores behind the image metrics, OUT/<category>/image_scores.csv (image, label: 1 =
    anomalous, score, anomalous: the run's decision or empty). Map-based methods score the
    maps at the model's resolution (RADAR scores with its Isolation Forest), so the scores
    are written out rather than left to be recomputed from the resized TIFFs."""
    import tifffile

    with staged_dir(out_dir) as tmp:
        for name, m in zip(split.names, full_size_maps(split, maps)):
            path = os.path.join(tmp, category, name + ".tiff")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tifffile.imwrite(path, np.asarray(m, np.float32))
        os.makedirs(os.path.join(tmp, category), exist_ok=True)
        with open(os.path.join(tmp, category, "image_scores.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label", "score", "anomalous"])
            for i, name in enumerate(split.names):
                writer.writerow([name, int(split.labels[i]), repr(float(scores[i])),
                                 "" if decided is None else int(decided[i])])


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
    """Scores image files; writes OUT/scores.csv, OUT/overlays/*.png, OUT/maps/*.tiff
    (overlays and maps at each image's own size).

    anomalous: the run's decision (Run.decide): score >= the calibrated threshold, or for
    radar the Isolation Forest's label (score > threshold 0)."""
    import tifffile

    from fmjax.data import folder

    d = run.config.data
    paths = folder.image_paths(input_path)
    images, names, sizes = folder.load_images(paths, d.image_size, d.channels)
    maps, scores = run.score(images)
    decided = run.decide(scores)
    threshold = 0.0 if run.config.method == "radar" else run.calibration.get("image_threshold")
    vmax = display_max(run, maps)
    rows = []
    with staged_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, "overlays"))
        os.makedirs(os.path.join(tmp, "maps"))
        for i, (path, name, size, m, s) in enumerate(zip(paths, names, sizes, maps, scores)):
            stem = os.path.splitext(name)[0].replace("/", "_")
            full = viz.resize_map(m, tuple(size))
            tifffile.imwrite(os.path.join(tmp, "maps", stem + ".tiff"), full.astype(np.float32))
            image = folder.read_full_size(path, images.shape[-1])  # overlays at the image's own size
            viz.save_png(os.path.join(tmp, "overlays", stem + ".png"), viz.overlay(image, full, vmax))
            rows.append({"image": name, "score": float(s),
                         "anomalous": "" if decided is None else int(decided[i]),
                         "threshold": "" if threshold is None else threshold})
        with open(os.path.join(tmp, "scores.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "score", "anomalous", "threshold"])
            writer.writeheader()
            writer.writerows(rows)
    return rows
