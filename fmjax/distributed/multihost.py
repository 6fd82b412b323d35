"""Multi-host start-up and which part of a global batch each process reads
(docs/multihost.md has the launch recipes)."""
from __future__ import annotations

import os
from typing import Mapping

import jax

from fmjax.errors import ConfigError

__all__ = ["is_writer", "maybe_initialize_distributed", "process_shard"]

_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _distributed_request(env: Mapping[str, str]):
    """initialize() keyword arguments when `env` asks for a multi-process run, else None."""
    address = next((env[k] for k in _ADDRESS_VARS if env.get(k)), None)
    if address is not None:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set with the coordinator address {address!r}")
        return {"coordinator_address": address, "num_processes": int(env["JAX_NUM_PROCESSES"]),
                "process_id": int(env["JAX_PROCESS_ID"])}
    if env.get("FMJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return {}  # JAX auto-detects the cluster (TPU VM metadata, Slurm, Open MPI, ...)
    if all(k in env for k in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return {}
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process
    run; returns whether it did. Must run before any other JAX computation.

    Recognised (in this order): JAX_COORDINATOR_ADDRESS (or COORDINATOR_ADDRESS) with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; FMJAX_DISTRIBUTED=1 (let JAX detect the cluster,
    e.g. on a TPU pod slice); a Slurm job with more than one task; an Open MPI launch with
    more than one rank; TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES naming several hosts,
    or MEGASCALE_COORDINATOR_ADDRESS (multi-slice TPU). An already initialized runtime is
    left alone (returns False)."""
    request = _distributed_request(os.environ if environ is None else environ)
    if request is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**request)
    return True


def process_shard(num_items: int, process_index: int, process_count: int) -> slice:
    """The contiguous part of `num_items` (a global batch) that process `process_index` of
    `process_count` handles; the parts in process order make up the whole."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if num_items % process_count:
        raise ValueError(f"global batch of {num_items} does not split over {process_count} processes; "
                         f"use a train.batch_size that is a multiple of {process_count}")
    per = num_items // process_count
    return slice(process_index * per, (process_index + 1) * per)


def is_writer(process_index: int | None = None) -> bool:
    """Whether this process (default: the current one) writes checkpoints, logs and
    config.json: process 0 only."""
    return (jax.process_index() if process_index is None else process_index) == 0
