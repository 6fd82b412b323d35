"""Orbax checkpoints of the training state under RUN/checkpoints.

Training opens the folder to write (unfinished saves a killed process left are removed);
everything else opens it read-only, so loading a run never writes to it. A checkpoint
that cannot be read or written is one line (TrainError / OSError) naming it.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax.config import Config
from fmjax.errors import TrainError, first_line
from fmjax.training.state import TrainState, abstract_state

__all__ = ["checkpoint_manager", "latest_step", "restore_state", "save_state"]


def _folder(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, "checkpoints"))


def checkpoint_manager(run_dir: str, config: Config | None = None) -> ocp.CheckpointManager:
    """The manager that writes RUN/checkpoints, keeping config.train.keep_checkpoints of them;
    without `config`, one that only reads."""
    if config is None:
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                               enable_async_checkpointing=False)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns of every read-only manager: noise on each evaluate
        try:
            return ocp.CheckpointManager(_folder(run_dir), options=options)
        finally:
            absl.setLevel(level)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(_folder(run_dir), options=options)


def latest_step(run_dir: str) -> int:
    """The step of the newest finished checkpoint; TrainError when there is none."""
    step = checkpoint_manager(run_dir).latest_step() if os.path.isdir(_folder(run_dir)) else None
    if step is None:
        raise TrainError(f"no checkpoint in {_folder(run_dir)}: train first")
    return step


def _state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "ema_params": state.ema_params,
            "opt_state": state.opt_state}


def _check_space(directory: str, path: str, state) -> None:
    """OSError (ENOSPC) naming `path` when the file system of `directory` has less room
    than `state`'s arrays take (+5% and 1 MB): a full disk is said before orbax starts
    writing, whose failures surface from its threads as many tracebacks."""
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
               if hasattr(x, "shape"))
    need = int(need * 1.05) + (1 << 20)
    existing = directory
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < need:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the checkpoint needs about {need / 2**20:.1f} MB, "
                                    f"{free / 2**20:.1f} MB are free", path)


def _join_new_threads(running: set, timeout_s: float = 10.0) -> None:
    """Waits (at most `timeout_s` in all) for the threads started since `running` was taken,
    but idle pool workers, which never end by themselves. A thread whose join raises its
    own failure (orbax's do) has ended: the save's error already says the cause."""
    deadline = time.monotonic() + timeout_s
    for thread in set(threading.enumerate()) - running:
        if thread is not threading.current_thread() and not thread.name.startswith("ThreadPoolExecutor"):
            with contextlib.suppress(Exception):
                thread.join(max(deadline - time.monotonic(), 0.0))


def _remove_unfinished(path: str, settle_s: float = 1.0) -> None:
    """Removes the unfinished checkpoint folders of `path`, again while one reappears within
    `settle_s` (a pool thread of the failed save that was still writing when it was joined)."""
    deadline = time.monotonic() + settle_s
    while True:
        for tmp in glob.glob(f"{path}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def _orbax_quieted():
    """Holds back what orbax's threads report while a save runs, possibly before the save
    raises it: their log records (absl, asyncio) and the unraisable "Event loop is closed"
    of each TensorStore write still pending when the save's event loop closed (printed on
    stderr). After a good save the loggers are as they were and the held errors are passed
    on; after a failed one both stay quiet, its one-line error says the cause (and its
    threads may still end)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    held, unraisable_hook = [], sys.unraisablehook
    sys.unraisablehook = held.append
    try:
        yield
    finally:
        sys.unraisablehook = unraisable_hook
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)
    for unraisable in held:
        unraisable_hook(unraisable)


def save_state(manager: ocp.CheckpointManager, step: int, state: TrainState) -> None:
    """Saves `state` as checkpoint `step` (every process calls it; orbax writes once). A
    save that fails (a full disk) leaves no unfinished checkpoint behind and raises an
    OSError naming it."""
    path = os.path.join(str(manager.directory), str(step))
    _check_space(str(manager.directory), path, state)
    running = set(threading.enumerate())
    with _orbax_quieted():
        try:
            manager.save(step, args=ocp.args.StandardSave(_state_dict(state)))
        except Exception as err:  # noqa: BLE001 - orbax and TensorStore raise several types for one cause
            _join_new_threads(running)  # the save's other threads may still write into its folder
            _remove_unfinished(path)
            raise _save_error(err, path) from None


def _save_error(err: Exception, path: str) -> OSError:
    """The OSError naming `path` that stands for orbax's or TensorStore's failure `err`."""
    if isinstance(err, OSError) and err.strerror:
        return OSError(err.errno, err.strerror, path)
    full = "No space left on device" in str(err)  # TensorStore's errors carry the cause as text only
    return OSError(errno.ENOSPC if full else None, os.strerror(errno.ENOSPC) if full else
                   f"cannot write the checkpoint ({first_line(err)})", path)


def restore_state(run_dir: str, config: Config, image_shape, step: int | None = None) -> TrainState:
    """Restores the latest (or given) checkpoint into the shapes `config` implies."""
    manager = checkpoint_manager(run_dir)
    step = latest_step(run_dir) if step is None else step
    # restore onto this process's devices, whatever topology wrote the checkpoint
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_state(config, image_shape))
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(_state_dict(abstract)))
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint surfaces as many types
        raise TrainError(f"checkpoint {os.path.join(_folder(run_dir), str(step))} cannot be read: it is damaged "
                         f"or was written by another config ({first_line(err)}); train again") from None
    return TrainState(**restored)
