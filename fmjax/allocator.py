"""The host memory allocator of fmjax's processes: tcmalloc, where the system has it.

XLA:CPU allocates every call's temporary buffer afresh and frees it when the call ends.
glibc's malloc serves a request that large (80 MB per device for the small preset's train
step, gigabytes for the paper preset's) from a thread other than the main one with new
pages from the kernel, and hands them back at free, so every call pays one page fault per
4 KiB page it touches. tcmalloc keeps freed memory for the next call. Measured on a 2-core
CPU, 2 XLA devices:
  small preset's train step (batch 32):            38,000-39,000 page faults, 48-104 ms of
      system time per step with glibc; `fmjax bench --quick` in three alternating pairs
      of runs, step 121.5-129.2 ms with tcmalloc against 146.2-149.5 ms
  paper preset's train step (batch 32 at 64x64):   1.1 million page faults, 2.4-7.3 s of
      system time per step with glibc; step 4.2-4.5 s against 5.8-8.2 s
Tried instead: jemalloc 5.3 with its default settings (the faults stayed, 39,000 a step);
glibc with one arena and without mmap (`mallopt`, no faults, but its lock made the
2-device step take twice as long).

`fmjax`'s command line and the experiment scripts restart themselves once with tcmalloc
preloaded (`use_tcmalloc`) where libtcmalloc is installed (Debian and Ubuntu:
`apt-get install libtcmalloc-minimal4`). FMJAX_ALLOCATOR=system keeps the system's malloc.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

__all__ = ["loaded_allocator", "tcmalloc_library", "use_tcmalloc"]

_RESTARTED = "FMJAX_ALLOCATOR_RESTARTED"
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


def use_tcmalloc() -> None:
    """Restart this process (same interpreter, same command line) with tcmalloc preloaded,
    unless it already runs with tcmalloc or another allocator, none is installed,
    FMJAX_ALLOCATOR is "system", this is not Linux, Python reads its program from stdin,
    or the process was already restarted once. Call it first thing in a program's entry
    point: nothing done before the restart survives it."""
    if (sys.platform != "linux" or os.environ.get("FMJAX_ALLOCATOR") == "system" or os.environ.get(_RESTARTED)
            or sys.argv[0] in ("", "-") or loaded_allocator() != "system"):
        return
    library = tcmalloc_library()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    os.environ.setdefault(_REPORT_THRESHOLD, str(2**50))
    os.environ[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
