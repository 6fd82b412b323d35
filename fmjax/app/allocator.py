"""The host memory allocator of fmjax's programs: tcmalloc, where the system has it.

XLA:CPU allocates every call's temporary buffers afresh and frees them when the call
ends; glibc's malloc returns such large blocks to the kernel, so every call pays a page
fault per page it touches, where tcmalloc keeps freed memory for the next call (on a
2-core CPU the small preset's train step took 14-18% less time; docs/performance.md).
An allocator can only be chosen before a process starts, so `use_tcmalloc` restarts the
program once with tcmalloc preloaded; the restarted process says so on stderr and takes
LD_PRELOAD back out of its environment, so processes it starts use the system's malloc.
FMJAX_ALLOCATOR=system keeps the system's malloc. Debian and Ubuntu:
`apt-get install libtcmalloc-minimal4`.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

__all__ = ["loaded_allocator", "tcmalloc_library", "use_tcmalloc"]

_RESTARTED = "FMJAX_ALLOCATOR_RESTARTED"  # holds the LD_PRELOAD the program was started with
# tcmalloc reports every allocation over 1 GB on stderr; the paper preset makes such allocations at every step
_REPORT_THRESHOLD = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def loaded_allocator() -> str:
    """"tcmalloc", "jemalloc" or "mimalloc" when this process has that library mapped,
    else "system"."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def tcmalloc_library() -> str | None:
    """The installed tcmalloc's library name for LD_PRELOAD, or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _after_restart() -> None:
    """In the restarted process: LD_PRELOAD and the restart marker back as they were
    before the restart, and one stderr line naming the allocator."""
    before = os.environ.pop(_RESTARTED)
    if before:
        os.environ["LD_PRELOAD"] = before
    else:
        os.environ.pop("LD_PRELOAD", None)
    if os.environ.get(_REPORT_THRESHOLD) == str(2**50):
        os.environ.pop(_REPORT_THRESHOLD)
    allocator = loaded_allocator()
    if allocator == "tcmalloc":
        print("fmjax: running with tcmalloc (faster XLA:CPU calls); FMJAX_ALLOCATOR=system keeps the system's "
              "malloc", file=sys.stderr, flush=True)


def use_tcmalloc() -> None:
    """Restart this program (same interpreter, same command line) with tcmalloc preloaded,
    unless it already runs with tcmalloc or another allocator, none is installed,
    FMJAX_ALLOCATOR is "system", this is not Linux, or Python reads its program from
    stdin. Call it first thing in a program's entry point (`fmjax.app.launch.start`
    does): nothing done before the restart survives it."""
    if _RESTARTED in os.environ:
        _after_restart()
        return
    if (sys.platform != "linux" or os.environ.get("FMJAX_ALLOCATOR") == "system"
            or sys.argv[0] in ("", "-") or loaded_allocator() != "system"):
        return
    library = tcmalloc_library()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    os.environ[_RESTARTED] = preload
    os.environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    os.environ.setdefault(_REPORT_THRESHOLD, str(2**50))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
