"""Orbax checkpoints of the training state under RUN/checkpoints."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from fmjax.config import Config
from fmjax.errors import TrainError
from fmjax.training.state import TrainState, abstract_state

__all__ = ["checkpoint_manager", "restore_state", "save_state"]


def checkpoint_manager(run_dir: str, config: Config | None = None) -> ocp.CheckpointManager:
    keep = config.train.keep_checkpoints if config is not None else None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options)


def _state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "ema_params": state.ema_params,
            "opt_state": state.opt_state}


def save_state(manager: ocp.CheckpointManager, step: int, state: TrainState) -> None:
    """Saves `state` as checkpoint `step` (every process calls it; orbax writes once)."""
    manager.save(step, args=ocp.args.StandardSave(_state_dict(state)))


def restore_state(run_dir: str, config: Config, image_shape, step: int | None = None) -> TrainState:
    """Restores the latest (or given) checkpoint into the shapes `config` implies."""
    manager = checkpoint_manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')}: train first")
    # restore onto this process's devices, whatever topology wrote the checkpoint
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_state(config, image_shape))
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(_state_dict(abstract)))
    except (ValueError, KeyError) as err:
        raise TrainError(f"checkpoint in {run_dir} does not match its config.json "
                         f"(was it written by another config?): {str(err).splitlines()[0]}") from None
    return TrainState(**restored)
