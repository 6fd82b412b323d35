"""How every fmjax program starts: the command line and each experiment script call
`start()` first, before anything imports JAX.

1. Memory allocator: on Linux with tcmalloc installed, the program restarts once with it
   preloaded and says so on stderr (`fmjax.app.allocator`); FMJAX_ALLOCATOR=system opts out.
2. Devices: on the CPU backend, XLA runs one device on about one core, so `start` asks
   for `devices` host devices (default: one per core) through `jax_num_cpu_devices`
   (nothing is written to the environment; a device count already in XLA_FLAGS wins).
   Training then uses the largest number of them that divides its batch.
3. Multi-host: `jax.distributed.initialize` when a multi-process run is asked for
   (JAX_COORDINATOR_ADDRESS, `--distributed` / FMJAX_DISTRIBUTED=1) or on a TPU pod slice,
   with a time limit (docs/multihost.md).
A program that has already imported and used JAX (a notebook, a test) keeps its
allocator and devices.
"""
from __future__ import annotations

import os
import sys

__all__ = ["start"]


def _cpu_devices(count: int) -> None:
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already ran something in this process: its devices stay
        pass


def start(devices: int = 0, distributed: bool | None = None, allocator: bool = True) -> None:
    """Prepares this process for fmjax (see the module docstring). devices: CPU host
    devices (0: one per core); distributed: None starts a multi-host run when the
    environment asks for one (JAX_COORDINATOR_ADDRESS, FMJAX_DISTRIBUTED=1, a TPU pod
    slice), True also lets JAX detect a Slurm or Open MPI job (--distributed), False never
    starts one; allocator: restart with tcmalloc where available."""
    if devices < 0:
        from fmjax.errors import LaunchError

        raise LaunchError(f"--devices must be >= 0 (0: one per core), got {devices}")
    fresh = "jax" not in sys.modules
    if allocator and fresh:
        from fmjax.app.allocator import use_tcmalloc

        use_tcmalloc()
    _cpu_devices(devices or os.cpu_count() or 1)
    if distributed is not False:
        from fmjax.distributed.multihost import maybe_initialize_distributed

        maybe_initialize_distributed(asked=bool(distributed))
