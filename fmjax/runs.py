"""The run folder: what training wrote and what scoring needs, saved and loaded as data.

RUN/config.json       the full Config (channels and auto flips resolved from the data)
RUN/data.json         the data spec and the category (or categories) it was trained on
RUN/checkpoints/      orbax checkpoints (params, EMA params, optimizer state, step)
RUN/train_log.jsonl   one line per logged step
RUN/calibration.json  what the method fitted on normal training images (thresholds, offsets),
                      the scoring settings it was fitted with (`settings`: the run's
                      scoring settings from then on) and the held-out images' names
RUN/calibration.npz   ... and its arrays (e.g. a forest's trees); read without pickles
RUN/manifest.json     the SHA-256 of the files above but checkpoints, checked on load
RUN/metrics.json      written by evaluate

Nothing here asks which method a run uses: the run's `Method` (fmjax.methods.registry)
scores, fits and decides. Loading a folder never executes code from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

from fmjax import data as data_lib
from fmjax.config import Config, apply_overrides, from_dict
from fmjax.errors import ConfigError, FmjaxError, RunError, first_line
from fmjax.files import write_json
from fmjax.methods import registry
from fmjax.methods.base import Fitted

__all__ = ["CALIBRATION", "CALIBRATION_ARRAYS", "CONFIG", "DATA", "HELD_OUT", "METRICS", "QUANTILES", "Run",
           "SETTINGS", "changed_settings", "check_score_overrides", "fit_run", "fitted_settings", "holdout_split",
           "load_run", "read_json", "save_fitted", "scoring_settings", "training_split", "write_json",
           "write_manifest"]

CONFIG, DATA, METRICS, MANIFEST = "config.json", "data.json", "metrics.json", "manifest.json"
CALIBRATION, CALIBRATION_ARRAYS = "calibration.json", "calibration.npz"
_MANIFEST_FILES = (CONFIG, DATA, CALIBRATION, CALIBRATION_ARRAYS)
SETTINGS, HELD_OUT = "settings", "held_out"  # calibration.json keys beside the method's own
QUANTILES = ("image_threshold_quantile", "pixel_threshold_quantile")  # the calibration settings a run may change


@dataclasses.dataclass
class Run:
    """A trained run ready to score: its config, data info, parameters (EMA ones by
    default) and what its method fitted on normal images."""

    path: str
    config: Config
    data_info: dict
    params: object
    fitted: Fitted
    _scorer: object = None
    refit: str = ""  # why load_run fitted the method again for this Run (empty: it did not)

    @property
    def method(self):
        return registry.get(self.config.method)

    @property
    def image_shape(self):
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    @property
    def calibration(self) -> dict:
        """The fitted JSON values (thresholds, ...)."""
        return self.fitted.values

    @property
    def scorer(self):
        """The method's jitted scorer (built once per Run)."""
        if self._scorer is None:
            from fmjax.nets import unet

            _, apply_fn = unet.build_model(self.config.net, self.image_shape)
            self._scorer = self.method.scorer(self.config, apply_fn, self.image_shape)
        return self._scorer

    def score(self, images, class_ids=None, fitted: Fitted | None = None):
        """uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]), higher = more
        anomalous, with the run's fitted state (or `fitted`)."""
        return self.scorer.score(self.params, images, class_ids, self.fitted if fitted is None else fitted)

    def decide(self, scores) -> np.ndarray | None:
        """Predicted labels int32 [N] (1 = anomalous) for scores from `score`, or None when
        the run has nothing fitted to decide with."""
        return self.method.decide(scores, self.fitted)

    def cost(self) -> dict:
        """Network evaluations per image, all of them and those that must run one after another."""
        return self.method.cost(self.config, self.image_shape)


# ----------------------------------------------------------------------------- files

def read_json(path: str, what: str = "file"):
    """The JSON in `path`; RunError (one line) when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the {what} was not written; train again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is damaged ({' '.join(str(err).split())}): train again") from None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(run_dir: str) -> None:
    """RUN/manifest.json: the SHA-256 of every run file there is but the checkpoints."""
    files = {name: _sha256(os.path.join(run_dir, name)) for name in _MANIFEST_FILES
             if os.path.exists(os.path.join(run_dir, name))}
    write_json(os.path.join(run_dir, MANIFEST), {"sha256": files})


def _check_manifest(run_dir: str) -> None:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.exists(path):
        return  # a folder written before manifests, or one still in training
    listed = read_json(path, "manifest").get("sha256", {})
    for name in _MANIFEST_FILES:
        file = os.path.join(run_dir, name)
        if name in listed and (not os.path.exists(file) or _sha256(file) != listed[name]):
            raise RunError(f"{file} is not the file this run wrote (changed, truncated or swapped): train again")
        if name not in listed and os.path.exists(file):
            raise RunError(f"{file} is not listed in {path}: remove it or train again")


def save_fitted(run_dir: str, fitted: Fitted) -> None:
    """RUN/calibration.json (values) and RUN/calibration.npz (arrays, if any), then the manifest."""
    write_json(os.path.join(run_dir, CALIBRATION), fitted.values)
    arrays_path = os.path.join(run_dir, CALIBRATION_ARRAYS)
    if fitted.arrays:
        tmp = f"{arrays_path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, **{k: np.asarray(v) for k, v in fitted.arrays.items()})
            os.replace(tmp, arrays_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    elif os.path.exists(arrays_path):
        os.remove(arrays_path)
    write_manifest(run_dir)


def load_fitted(run_dir: str) -> Fitted:
    """What save_fitted wrote (empty when the run was not calibrated). The arrays are read
    with allow_pickle=False: an object array is refused, never unpickled."""
    values_path, arrays_path = os.path.join(run_dir, CALIBRATION), os.path.join(run_dir, CALIBRATION_ARRAYS)
    values = read_json(values_path, "calibration") if os.path.exists(values_path) else {}
    if not isinstance(values, dict):
        raise RunError(f"{values_path} is damaged (not a JSON object): train again")
    arrays = {}
    if os.path.exists(arrays_path):
        try:
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise RunError(f"{arrays_path} is damaged or not plain arrays ({' '.join(str(err).split())}): "
                           f"train again") from None
    return Fitted(values=values, arrays=arrays)


# ----------------------------------------------------------------------------- fitting

def training_split(config: Config, data_info: dict):
    """The normal training images a run was trained on (all categories, with their class
    ids, for `--category all`), read again from data.json's spec."""
    spec, category = data_info.get("spec"), data_info.get("category")
    if not spec:
        raise RunError("the run's data.json names no data: pass --data when training")
    if category == "all":
        datasets = data_lib.load_all(spec, config.data, data_info.get("categories"))
        return data_lib.unified_train(datasets)
    if spec.startswith(("textures:", "fashion_mnist:")):
        category = None
    return data_lib.load(spec, category, config.data, config.textures).train


def holdout_split(config: Config, train):
    """(fit, holdout) of the normal training Split `train` under config.calibration:
    holdout_fraction of it, at least min(min_holdout, N - min_holdout) images, drawn from
    calibration.seed; holdout is None when holdout_fraction is 0."""
    cal = config.calibration
    return data_lib.split_holdout(train, cal.holdout_fraction, cal.seed, cal.min_holdout)


def scoring_settings(config: Config) -> dict:
    """What a fitted state depends on beyond the network: the scoring settings and the
    threshold quantiles, as stored under calibration.json's `settings`."""
    return {"score": dataclasses.asdict(config.score),
            "calibration": {k: getattr(config.calibration, k) for k in QUANTILES}}


def fitted_settings(config: Config, fitted: Fitted) -> Config:
    """`config` with the scoring settings its fitted state records (calibration.json's
    `settings`, written by fit_run); unchanged for a state that records none."""
    recorded = fitted.get(SETTINGS)
    if recorded is None:
        return config
    try:
        score = from_dict(registry.settings_class(config.method), recorded["score"])
        cal = dataclasses.replace(config.calibration, **{k: float(recorded["calibration"][k]) for k in QUANTILES})
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise RunError(f"calibration.json's settings are damaged ({first_line(err)}): "
                       f"run fmjax calibrate on the run") from None
    return dataclasses.replace(config, score=score, calibration=cal)


def changed_settings(config: Config, new: Config) -> list[str]:
    """The settings that make a state fitted under `config` stale under `new`, as
    'score.num_paths 4 -> 8' (the method's neutral ones, batching and chunking, never)."""
    method = registry.get(config.method)
    if not method.needs_refit(config.score, new.score) and all(
            getattr(config.calibration, k) == getattr(new.calibration, k) for k in QUANTILES):
        return []
    neutral = set(method.settings.NEUTRAL)
    pairs = [(f"score.{f.name}", getattr(config.score, f.name), getattr(new.score, f.name))
             for f in dataclasses.fields(config.score) if f.name not in neutral]
    pairs += [(f"calibration.{k}", getattr(config.calibration, k), getattr(new.calibration, k)) for k in QUANTILES]
    return [f"{key} {old!r} -> {value!r}" for key, old, value in pairs if old != value] or ["score"]


def fit_run(run: Run, train=None) -> Fitted:
    """Fits the run's method on the normal training images `train` (a Split; default: read
    again from data.json) and the held-out part of them (`holdout_split`); the result
    records the scoring settings (`scoring_settings`) and the held-out images' names. A
    run whose calibration names other held-out images (its data changed) is refused."""
    train = training_split(run.config, run.data_info) if train is None else train
    _, holdout = holdout_split(run.config, train)
    names = [] if holdout is None else [str(n) for n in holdout.names]
    recorded = run.fitted.get(HELD_OUT) if run.fitted is not None else None
    if recorded is not None and list(recorded) != names:
        raise RunError(f"the training data of {run.path} changed since it was calibrated (its held-out normal images "
                       f"are not those calibration.json names): score with the run's own settings or train again")
    fitted = run.method.fit(run, train.images, holdout)
    return Fitted(values={**fitted.values, SETTINGS: scoring_settings(run.config), HELD_OUT: names},
                  arrays=fitted.arrays)


# ----------------------------------------------------------------------------- load

def check_score_overrides(config: Config, overrides) -> list:
    """`overrides` if each is a scoring setting that may change after training: score.*
    (but the ones the method's network was trained with) or a threshold quantile
    (calibration.image_threshold_quantile, calibration.pixel_threshold_quantile);
    ConfigError otherwise."""
    training = registry.settings_module(config.method).TRAINING
    allowed = {f"calibration.{k}" for k in QUANTILES}
    for item in overrides or ():
        key = item.split("=", 1)[0].strip()
        if key in allowed:
            continue
        if not key.startswith("score.") or key[len("score."):] in training:
            fixed = f" but {', '.join('score.' + f for f in training)}" if training else ""
            raise ConfigError(f"--set {item!r}: only scoring settings (score.*{fixed}, "
                              f"calibration.*_threshold_quantile) can change after training")
    return list(overrides or ())


def load_run(run_dir: str, score_overrides=None) -> Run:
    """Restores a trained run (EMA params by default) ready to score, with the scoring
    settings its calibration was fitted with (calibration.json's `settings`; config.json's
    for a run that records none).

    score_overrides: scoring settings for this Run only (["score.num_paths=32", ...]).
    When they change what the method fitted on normal images, it is fitted again on the
    run's held-out normals (the folder stays as it is; `fmjax calibrate` stores it) and
    `Run.refit` says why.
    """
    from fmjax.training.checkpoints import restore_state

    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist: train first (fmjax train --out {run_dir})")
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} is missing: {run_dir} is not a finished fmjax run")
    _check_manifest(run_dir)
    fitted = load_fitted(run_dir)
    try:
        saved = fitted_settings(Config.from_dict(read_json(config_path, "config")), fitted)
        config = apply_overrides(saved, check_score_overrides(saved, score_overrides))
    except ConfigError as err:
        if score_overrides:
            raise
        raise RunError(f"{config_path} is not a valid config ({err}): train again") from None
    data_path = os.path.join(run_dir, DATA)
    data_info = read_json(data_path, "data info") if os.path.exists(data_path) else {}
    state = restore_state(run_dir, config, (config.data.image_size, config.data.image_size, config.data.channels))
    params = state.ema_params if config.score.use_ema else state.params
    run = Run(run_dir, config, data_info, params, fitted)
    changed = changed_settings(saved, config)
    if changed:
        try:
            run.fitted = fit_run(run)
        except FmjaxError as err:
            raise RunError(f"these scoring settings need what the run fitted on normal images fitted again, "
                           f"on its training data: {first_line(err)}") from None
        held_out = len(run.fitted.get(HELD_OUT) or [])
        run.refit = (f"{', '.join(changed)}: fitted again on the run's {held_out} held-out normal images for these "
                     f"settings (not saved; fmjax calibrate --run {run_dir} --set ... saves them)")
    return run
