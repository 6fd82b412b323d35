"""The run folder: what training wrote and what scoring needs, saved and loaded as data.

RUN/config.json       the full Config (channels and auto flips resolved from the data)
RUN/data.json         the data spec and the category (or categories) it was trained on
RUN/checkpoints/      orbax checkpoints (params, EMA params, optimizer state, step)
RUN/train_log.jsonl   one line per logged step
RUN/calibration.json  what the method fitted on normal training images (thresholds, offsets),
                      the scoring settings it was fitted with (`settings`: the run's
                      scoring settings from then on) and the held-out images' names
RUN/calibration.npz   ... and its arrays (e.g. a forest's trees); read without pickles
RUN/manifest.json     the SHA-256 of the files above and of every checkpoint file, checked
                      on load: a changed, truncated or swapped file is named as such
RUN/metrics.json      written by evaluate
RUN/.fmjax-lock       while a command uses the folder (`lock`)

Nothing here asks which method a run uses: the run's `Method` (fmjax.methods.registry)
scores, fits and decides. Loading a folder never executes code from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import time
import zipfile

import numpy as np

from fmjax import data as data_lib
from fmjax.config import Config, apply_overrides, from_dict
from fmjax.errors import ConfigError, FmjaxError, RunError, first_line, warn
from fmjax.files import process_alive, remove_stale, sha256_of, write_bytes_with, write_json
from fmjax.methods import registry
from fmjax.methods.base import Fitted

__all__ = ["CALIBRATION", "CALIBRATION_ARRAYS", "CONFIG", "DATA", "HELD_OUT", "MANIFEST", "METRICS", "QUANTILES",
           "Run", "SETTINGS", "changed_settings", "check_score_overrides", "fit_run", "fitted_settings",
           "holdout_split", "load_run", "lock", "read_json", "remove_manifest", "save_fitted", "scoring_settings",
           "training_split", "write_json", "write_manifest"]

CONFIG, DATA, METRICS, MANIFEST = "config.json", "data.json", "metrics.json", "manifest.json"
CALIBRATION, CALIBRATION_ARRAYS = "calibration.json", "calibration.npz"
CHECKPOINTS, LOCK = "checkpoints", ".fmjax-lock"
_MANIFEST_FILES = (CONFIG, DATA, CALIBRATION, CALIBRATION_ARRAYS)
SETTINGS, HELD_OUT, CHOSEN = "settings", "held_out", "settings_chosen"  # calibration.json keys beside the method's own
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

    def image_scores(self, images, class_ids=None):
        """uint8 [N,H,W,C] -> the image scores float32 [N] of `score`, through the scorer's
        own path without the maps where it has one (`Scorer.image_scores`)."""
        if hasattr(self.scorer, "image_scores"):
            return self.scorer.image_scores(self.params, images, class_ids, self.fitted)
        return self.score(images, class_ids)[1]

    def class_id(self, category: str | None) -> int:
        """The class label a class-conditional run (net.num_classes > 0, trained with
        `--category all`) gives images of `category`: its index among the run's categories;
        0 for any other run (its network takes no class). RunError when the run is
        class-conditional and `category` is None or not one it was trained on."""
        if not self.config.net.num_classes:
            return 0
        categories = list(self.data_info.get("categories") or [])
        if category in categories:
            return categories.index(category)
        known = ", ".join(str(c) for c in categories)
        if category is None:
            raise RunError(f"{self.path} is one class-conditional model of {len(categories)} categories ({known}): "
                           f"pass --category with the category the images show")
        raise RunError(f"{self.path} is a class-conditional model of {known}, not of {category!r}: "
                       f"pass --category with one of those")

    def decide(self, scores) -> np.ndarray | None:
        """Predicted labels int32 [N] (1 = anomalous) for scores from `score`, or None when
        the run has nothing fitted to decide with."""
        return self.method.decide(scores, self.fitted)

    def cost(self, maps: bool = True) -> dict:
        """Network evaluations per image, all of them and those that must run one after
        another; maps=False: of `image_scores`."""
        return self.method.cost(self.config, self.image_shape, maps)


# ----------------------------------------------------------------------------- lock

def _holder(path: str) -> dict:
    """What the lock file says of the process holding it ({} when it says nothing usable)."""
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return {}
    return {k: holder[k] if k == "pid" else str(holder.get(k, "?"))[:100] for k in ("command", "pid", "host", "since")}


def _written_holder(path: str, patience_s: float = 1.0) -> dict:
    """`_holder(path)`, waiting up to `patience_s` for a holder that has just taken the lock
    to write who it is ({} when it still says nothing)."""
    deadline = time.monotonic() + patience_s
    while not (holder := _holder(path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return holder


def _describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another fmjax process"
    return (f"fmjax {holder.get('command', '?')} (process {holder['pid']} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


@contextlib.contextmanager
def lock(run_dir: str, command: str, shared: bool = False, enabled: bool = True):
    """Holds RUN/.fmjax-lock while the block runs: exclusive for a command that writes the
    folder (train, evaluate), shared for one that only reads it (predict). A folder another
    process holds is refused at once (RunError naming that process). The lock is the
    operating system's (flock): a process that dies, even by kill -9, releases it, and
    the next one says that it takes over. Then the temporary files that process left are
    removed. `enabled` False (the processes of a multi-host run but the first) takes none."""
    if not enabled:
        yield
        return
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist: train first (fmjax train --out {run_dir})")
    path = os.path.join(run_dir, LOCK)
    fd = _take_lock(run_dir, path, shared)
    if fd is None:
        yield
        return
    try:
        previous = _holder(path)
        if previous and not shared and (previous["host"] != socket.gethostname()
                                        or not process_alive(previous["pid"])):
            warn(f"{run_dir} was left locked by {_describe_holder(previous)}, which ended without releasing it: "
                 f"taking it over")
        if not shared:
            remove_stale(run_dir)
        me = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        with contextlib.suppress(OSError):  # who holds it is for messages only: a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while other readers hold it: they remove it
            os.remove(path)
        os.close(fd)


def _take_lock(run_dir: str, path: str, shared: bool):
    """The descriptor of the locked file `path`, or None where locking is impossible and
    the command may go on without (a read-only folder for a reader, a file system without
    locks)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if shared and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None  # nobody can write a folder this process cannot lock
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if isinstance(err, BlockingIOError):
                raise RunError(f"{run_dir} is in use by {_describe_holder(_written_holder(path))}: wait until it ends, "
                               f"or use another folder") from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            warn(f"cannot lock {run_dir} (its file system has no locks): make sure no other fmjax command uses it")
            return None
        try:  # a holder that ended in between removed the file: lock the one there now
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


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


def _checkpoint_files(run_dir: str, step=None) -> list[str]:
    """Paths relative to `run_dir` ('checkpoints/<step>/...') of every checkpoint file, or of
    checkpoint `step`'s."""
    top = os.path.join(run_dir, CHECKPOINTS) if step is None else os.path.join(run_dir, CHECKPOINTS, str(step))
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if "tmp" not in d]  # an unfinished save is no part of the run
        found += [os.path.relpath(os.path.join(root, f), run_dir).replace(os.sep, "/") for f in files]
    return sorted(found)


def write_manifest(run_dir: str) -> None:
    """RUN/manifest.json: the SHA-256 of every run file there is and of every checkpoint file."""
    names = [n for n in _MANIFEST_FILES if os.path.exists(os.path.join(run_dir, n))] + _checkpoint_files(run_dir)
    write_json(os.path.join(run_dir, MANIFEST), {"sha256": {name: sha256_of(os.path.join(run_dir, name))
                                                            for name in names}, "checkpoints": True})


def remove_manifest(run_dir: str) -> None:
    """Removes RUN/manifest.json before the folder changes (training); written again at its end."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, MANIFEST))


def _check_manifest(run_dir: str, step: int) -> None:
    """RunError naming the first file of the run (and of checkpoint `step`, the one to be
    restored) that is not the file training wrote."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.exists(path):
        return  # a folder written before manifests
    manifest = read_json(path, "manifest")
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise RunError(f"{path} is damaged (no 'sha256' table): train again")
    prefix = f"{CHECKPOINTS}/{step}/"
    names = list(_MANIFEST_FILES)
    if manifest.get("checkpoints"):  # manifests of earlier releases list no checkpoint files
        names += sorted(set(_checkpoint_files(run_dir, step)) | {n for n in listed if n.startswith(prefix)})
    for name in names:
        file = os.path.join(run_dir, name)
        if name in listed and (not os.path.exists(file) or sha256_of(file) != listed[name]):
            what = "checkpoint file" if name.startswith(CHECKPOINTS) else "file"
            state = ("missing" if not os.path.exists(file)
                     else "not the one training wrote (changed, truncated or swapped)")
            raise RunError(f"{file} is {state}: this {what} of the run is damaged; copy the run folder again "
                           f"or train again")
        if name not in listed and os.path.exists(file):
            raise RunError(f"{file} is not listed in {path}: remove it or train again")


def save_fitted(run_dir: str, fitted: Fitted) -> None:
    """RUN/calibration.json (values) and RUN/calibration.npz (arrays, if any), then the manifest."""
    write_json(os.path.join(run_dir, CALIBRATION), fitted.values)
    arrays_path = os.path.join(run_dir, CALIBRATION_ARRAYS)
    if fitted.arrays:
        write_bytes_with(arrays_path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in fitted.arrays.items()}))
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
    again from data.json): the part the network trained on and the held-out part
    (`holdout_split`); the result
    records the scoring settings (`scoring_settings`) and the held-out images' names. The
    settings the method chooses from the data (`Method.resolve_settings`: RADAR's "auto")
    are chosen first and become `run`'s; how, under calibration.json's `settings_chosen`. A
    run whose calibration names other held-out images (its data changed) is refused."""
    train = training_split(run.config, run.data_info) if train is None else train
    trained, holdout = holdout_split(run.config, train)
    names = [] if holdout is None else [str(n) for n in holdout.names]
    recorded = run.fitted.get(HELD_OUT) if run.fitted is not None else None
    if recorded is not None and list(recorded) != names:
        raise RunError(f"the training data of {run.path} changed since it was calibrated (its held-out normal images "
                       f"are not those calibration.json names): score with the run's own settings or train again")
    settings, chosen = run.method.resolve_settings(run, trained, holdout)
    if settings != run.config.score:
        run.config, run._scorer = run.config.replace(score=settings), None
    fitted = run.method.fit(run, trained, holdout)
    return Fitted(values={**fitted.values, **({CHOSEN: chosen} if chosen else {}), SETTINGS: scoring_settings(run.config),
                          HELD_OUT: names}, arrays=fitted.arrays)


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
    from fmjax.training.checkpoints import latest_step, restore_state

    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist: train first (fmjax train --out {run_dir})")
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} is missing: {run_dir} is not a finished fmjax run")
    step = latest_step(run_dir)
    _check_manifest(run_dir, step)
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
    state = restore_state(run_dir, config, (config.data.image_size, config.data.image_size, config.data.channels),
                          step)
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
