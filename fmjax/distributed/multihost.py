"""Multi-host start-up and which part of a global batch each process reads
(docs/multihost.md has the launch recipes)."""
from __future__ import annotations

import os
import sys
import threading
from typing import Mapping

import jax

from fmjax.errors import LaunchError, first_line, warn

__all__ = ["is_writer", "maybe_initialize_distributed", "process_shard"]

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
TIMEOUT_VAR, DEFAULT_TIMEOUT = "FMJAX_DISTRIBUTED_TIMEOUT", 120  # seconds for every process to connect


def _tpu_pod_slice(env: Mapping[str, str]) -> bool:
    """Whether the TPU runtime's variables describe several hosts (read without asking
    any server, so deciding cannot wait)."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _cluster_launch(env: Mapping[str, str]) -> str | None:
    """'Slurm' or 'Open MPI' when `env` is one task of several of that launcher, else None."""
    if all(k in env for k in _SLURM_VARS) and env["SLURM_NTASKS"].isdigit() and int(env["SLURM_NTASKS"]) > 1:
        return "Slurm"
    size = env.get("OMPI_COMM_WORLD_SIZE", "1")
    if "OMPI_MCA_orte_hnp_uri" in env and size.isdigit() and int(size) > 1:
        return "Open MPI"
    return None


def _distributed_request(env: Mapping[str, str], asked: bool = False):
    """initialize() keyword arguments when a multi-process run is asked for, else None:
    JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID; `asked`
    (--distributed) or FMJAX_DISTRIBUTED=1, where JAX detects the cluster (Slurm, Open
    MPI, TPU); a TPU pod slice, without asking."""
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k, "").isdigit()]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} must be set to a number with JAX_COORDINATOR_ADDRESS="
                              f"{address}: set both, or unset JAX_COORDINATOR_ADDRESS for a single-process run")
        return {"coordinator_address": address, "num_processes": int(env["JAX_NUM_PROCESSES"]),
                "process_id": int(env["JAX_PROCESS_ID"])}
    if asked or env.get("FMJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes") or _tpu_pod_slice(env):
        return {}
    return None


def _timeout(env: Mapping[str, str]) -> int:
    text = env.get(TIMEOUT_VAR, str(DEFAULT_TIMEOUT))
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"{TIMEOUT_VAR} must be a whole number of seconds >= 1, got {text!r}")
    return int(text)


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None, asked: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when a multi-process run is asked for (see
    `_distributed_request`; docs/multihost.md); returns whether it did. Must run before
    any other JAX computation. Start-up waits at most FMJAX_DISTRIBUTED_TIMEOUT seconds
    (default 120) for every process, then ends this process with one line on stderr and
    exit code 2 (JAX itself would abort it with a C++ stack trace). One task of a Slurm or
    Open MPI job of several, not asked, runs alone and says so. An already initialized
    runtime is left alone (returns False)."""
    env = os.environ if environ is None else environ
    request = _distributed_request(env, asked)
    if request is None:
        launcher = _cluster_launch(env)
        if launcher:
            warn(f"this process is one of several {launcher} tasks but runs alone: pass --distributed "
                 f"(or set FMJAX_DISTRIBUTED=1) to make the tasks one run")
        return False
    if jax.distributed.is_initialized():
        return False
    timeout = _timeout(env)
    where = f"the coordinator at {request['coordinator_address']}" if request else "the cluster JAX detected"
    advice = f"start every process, check the address, or raise {TIMEOUT_VAR}"
    watchdog = threading.Timer(timeout, _give_up, [f"multi-host start-up with {where}: not every process "
                                                   f"connected within {timeout} s: {advice}"])
    watchdog.daemon = True
    watchdog.start()
    try:  # JAX's own limit a little later: the watchdog speaks first
        jax.distributed.initialize(**request, initialization_timeout=timeout + 30)
    except Exception as err:  # noqa: BLE001 - JAX raises several types; the user needs one line
        raise LaunchError(f"multi-host start-up with {where} failed ({first_line(err)}): {advice}") from None
    finally:
        watchdog.cancel()
    return True


def _give_up(message: str) -> None:
    print(f"fmjax: error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is inside JAX's connect, which cannot be interrupted


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
