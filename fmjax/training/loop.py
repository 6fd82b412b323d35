"""The training loop every method shares: batches in a fixed order, the jitted step (mesh
or pmap), a JSONL log, a stop on a non-finite loss, orbax checkpoints and bit-exact
resume.

Randomness: the step key is fold_in(run key, step) and the batch order is a function of
(seed, step) only, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from fmjax.config import Config
from fmjax.distributed import multihost, placement
from fmjax.distributed.mesh import data_mesh, devices_for_batch, global_mesh, replicated, rows
from fmjax.errors import ConfigError, TrainError
from fmjax.files import write_text_atomic, writing
from fmjax.nets import unet
from fmjax.training.checkpoints import checkpoint_manager, restore_state, save_state
from fmjax.training.state import TrainState, init_state
from fmjax.training.step import Objective, make_heldout_loss_fn, make_pmap_step_fn, make_step_fn

__all__ = ["batch_indices", "heldout_evaluator", "host_batch_indices", "log_window", "train"]


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the batch for `step`: epoch-wise permutations that depend on (seed, epoch) only."""
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // num_items
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % num_items]
    return out


def host_batch_indices(step: int, num_items: int, global_batch: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
    """Indices of the images this process reads for `step`: its slice of
    `batch_indices(step, num_items, global_batch, seed)`; concatenated over processes in
    order they are exactly the single-host batch. Defaults: this process."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    part = multihost.process_shard(global_batch, process_index, process_count)
    return batch_indices(step, num_items, global_batch, seed)[part]


def _saved_config(path: str):
    try:
        with open(path) as f:
            return Config.from_json(f.read())
    except (ValueError, UnicodeDecodeError) as err:  # JSON errors and ConfigError
        raise TrainError(f"--resume: {path} is damaged ({' '.join(str(err).split())}); use a new --out") from None


def _open_run(config: Config, run_dir: str, init_shape, resume: bool, init_key, writer: bool):
    """(state, checkpoint manager): the latest checkpoint when resuming, else a fresh state
    (and RUN/config.json written). Existing checkpoints need resume and the same config."""
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    manager = checkpoint_manager(run_dir, config)
    if manager.latest_step() is not None:
        if not resume:
            raise TrainError(f"{run_dir} already holds checkpoints: pass --resume to continue or choose a new --out")
        if not os.path.exists(config_path) or _saved_config(config_path) != config:
            raise TrainError(f"--resume: {config_path} differs from this run's config; "
                             f"resume with the same preset and --set overrides, or use a new --out")
        return restore_state(run_dir, config, init_shape), manager
    if writer:
        write_text_atomic(config_path, config.to_json())
    return init_state(config, init_shape, init_key), manager


def heldout_evaluator(config: Config, objective: Objective, module, heldout, multi_process: bool):
    """`make_heldout_loss_fn`'s evaluation when this run logs the held-out loss
    (train.heldout_loss or early stopping, held-out images given, one process), else None."""
    cfg = config.train
    if heldout is None or not len(heldout[0]) or multi_process or not (cfg.heldout_loss or cfg.early_stop_patience):
        return None
    return make_heldout_loss_fn(objective, module, config)


def _heldout_history(log_path: str, upto: int) -> tuple:
    """(best held-out loss, checkpoint evaluations since it) from the log's records up to
    step `upto`: where a resumed run's early stopping stood."""
    best, since = math.inf, 0
    if not os.path.exists(log_path):
        return best, since
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            if record["step"] <= upto and "heldout_loss" in record:
                best, since = _track_best(best, since, record["heldout_loss"])
    return best, since


def _keep_log_upto(log_path: str, step: int) -> None:
    """Drops the log's records after `step`, where training starts: a run killed after its
    last checkpoint logged steps it trains again on resume (step 0: no log at all)."""
    if not os.path.exists(log_path):
        return
    if step == 0:
        os.remove(log_path)
        return
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the kill
            continue
        if record["step"] <= step:
            kept.append(line.rstrip("\n") + "\n")
    if kept != lines:
        write_text_atomic(log_path, "".join(kept))


def _track_best(best: float, since: int, value: float) -> tuple:
    """(best, checkpoints since it) after one more held-out loss `value`."""
    return (value, 0) if value < best else (best, since + 1)


def train(config: Config, objective: Objective, images: np.ndarray, run_dir: str, class_ids=None,
          resume: bool = False, progress: bool = True, devices=None, stop_at: int | None = None,
          use_pmap: bool = False, init_shape=None, on_log=None, heldout=None) -> TrainState:
    """Trains the network on normal images uint8 [N,H,W,C] for `objective`; returns the
    final state (as one copy).

    Writes RUN/config.json, RUN/train_log.jsonl and orbax checkpoints under RUN/checkpoints.
    class_ids: int [N] (the class-conditional model's labels; zeros when None).
    devices: the local devices (default: all); a batch that does not split over all of them
    uses the largest number that divides it. init_shape: the shape (h, w, C) the params are
    initialised at (default: the images'; the U-Net is fully convolutional).
    on_log(record): called with each train_log.jsonl record (step, loss, grad_norm,
    images_per_s) on the writing process, e.g. for TensorBoard.
    heldout: (images uint8 [M,H,W,C], class_ids [M]) of held-out normals: with
    train.heldout_loss, at every checkpoint the EMA network's loss on them
    (`make_heldout_loss_fn`, the same draws each time) is logged as heldout_loss, and with
    train.early_stop_patience = P > 0 (which logs it too) training
    stops once P checkpoints in a row have not lowered it (single-process runs only).
    `stop_at` ends early after that step (the run can be resumed). `use_pmap` runs the pmap
    step instead of the mesh step: same result. On several processes (after
    `multihost.maybe_initialize_distributed()`) every process runs this with the same
    arguments over all devices; each reads its rows of every batch and only process 0
    writes config.json, the log and the progress bar.
    """
    cfg = config.train
    if len(images) == 0:
        raise ConfigError("no training images")
    multi_process = jax.process_count() > 1
    if multi_process:
        if devices is not None:
            raise ConfigError("devices cannot be chosen in a multi-process run: it uses every device")
        mesh = global_mesh()
        if cfg.batch_size % mesh.devices.size:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {mesh.devices.size} devices; "
                              f"set train.batch_size to a multiple of {mesh.devices.size}")
    else:
        mesh = data_mesh(devices_for_batch(devices if devices is not None else jax.local_devices(), cfg.batch_size))
    if cfg.early_stop_patience and (heldout is None or multi_process):
        raise ConfigError("train.early_stop_patience needs held-out normal images and a single-process run")
    writer = multihost.is_writer()
    class_ids = np.zeros(len(images), np.int32) if class_ids is None else np.asarray(class_ids, np.int32)
    init_key, run_key = objective.seed_keys(cfg.seed)
    state, manager = _open_run(config, run_dir, tuple(init_shape or images.shape[1:]), resume, init_key, writer)

    module = unet.UNet(config.net, out_channels=images.shape[-1])
    if use_pmap:
        pmap_devices = list(mesh.devices.flat)
        local_devices = [d for d in pmap_devices if d.process_index == jax.process_index()]
        state = placement.replicate(state, local_devices)
        step_fn = make_pmap_step_fn(objective, module, config, pmap_devices)
    else:
        state = jax.device_put(state, replicated(mesh))
        run_key = jax.device_put(run_key, replicated(mesh))
        step_fn = make_step_fn(objective, module, config, mesh)
    current = placement.unreplicate if use_pmap else (lambda s: s)  # the state as one copy

    start = int(current(state).step)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    log_path = os.path.join(run_dir, "train_log.jsonl")
    if writer:
        _keep_log_upto(log_path, start)
    bar = _progress(start, cfg.steps, progress and writer)
    evaluate_heldout = heldout_evaluator(config, objective, module, heldout, multi_process)
    if evaluate_heldout:
        heldout_images, heldout_ids = np.asarray(heldout[0]), np.asarray(heldout[1], np.int32)
        heldout_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2)
    best, since_best = _heldout_history(log_path, start) if evaluate_heldout else (math.inf, 0)
    if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:
        end = start  # stopped early before; a resume does not train on
    window, window_start = [], time.perf_counter()
    for step in range(start, end):
        idx = host_batch_indices(step, len(images), cfg.batch_size, cfg.seed)
        if use_pmap:
            n = len(local_devices)
            batch, batch_ids = placement.shard_batch(images[idx], n), placement.shard_batch(class_ids[idx], n)
        elif multi_process:
            batch = placement.assemble_global_batch(images[idx], mesh)
            batch_ids = placement.assemble_global_batch(class_ids[idx], mesh)
        else:
            batch = jax.device_put(images[idx], rows(mesh))
            batch_ids = jax.device_put(class_ids[idx], rows(mesh))
        state, metrics = step_fn(state, batch, batch_ids, run_key)
        if use_pmap:
            metrics = jax.tree.map(lambda m: m[0], metrics)  # summed over devices: every device holds the same
        window.append(metrics)
        done = step + 1
        # a checkpoint step also logs, so a NaN state is caught before it is saved
        checkpoint = done % cfg.checkpoint_every == 0 or done == end
        if done % cfg.log_every == 0 or checkpoint:
            values = jax.device_get(window)
            elapsed = time.perf_counter() - window_start
            extra = {}
            if checkpoint and evaluate_heldout:
                extra["heldout_loss"] = evaluate_heldout(current(state).ema_params, heldout_images, heldout_ids,
                                                         heldout_key)
            record = log_window(values, done, cfg.batch_size, elapsed, log_path if writer else None, bar, extra)
            if on_log is not None and writer:
                on_log(record)
            window, window_start = [], time.perf_counter()
        if checkpoint:
            save_state(manager, done, current(state))  # every process saves; orbax writes once
            window_start = time.perf_counter()  # checkpoint and held-out time is not training throughput
            if evaluate_heldout:
                best, since_best = _track_best(best, since_best, extra["heldout_loss"])
                if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:
                    bar.write(f"early stop at step {done}: the held-out loss has not fallen below {best:.5f} "
                              f"for {since_best} checkpoints")
                    break
    manager.wait_until_finished()
    bar.close()
    return current(state)


def log_window(values, step: int, batch_size: int, elapsed: float, log_path, bar, extra=None) -> dict:
    """Averages a window of step metrics, stops on a non-finite loss, appends one JSONL
    line to `log_path` (when given; with the values of `extra`, e.g. heldout_loss) and
    updates the progress bar."""
    record = {"step": step,
              "loss": float(np.mean([v["loss"] for v in values])),
              "grad_norm": float(np.mean([v["grad_norm"] for v in values])),
              "images_per_s": len(values) * batch_size / max(elapsed, 1e-9), **(extra or {})}
    if not math.isfinite(record["loss"]):
        raise TrainError(f"loss became {record['loss']} by step {step}; "
                         f"lower train.learning_rate or set train.grad_clip_norm")
    if log_path:
        with writing(log_path), open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    bar.update(len(values))
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    return record


def _progress(start, total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
