"""`fmjax.allocator`: the command line restarts itself once with tcmalloc where it is
installed, never loops, and keeps the system's malloc when asked to."""
import os
import subprocess
import sys

import pytest

from fmjax import allocator

needs_tcmalloc = pytest.mark.skipif(allocator.tcmalloc_library() is None,
                                    reason="libtcmalloc is not installed (apt-get install libtcmalloc-minimal4)")

# prints "start" each time the program begins, then the allocator it runs with
PROGRAM = """
import os, sys
from fmjax import allocator
print("start", flush=True)
if len(sys.argv) > 1:
    allocator.tcmalloc_library = lambda: sys.argv[1]
allocator.use_tcmalloc()
print(allocator.loaded_allocator(), os.environ.get("FMJAX_ALLOCATOR_RESTARTED"), os.environ.get("LD_PRELOAD"))
"""


def _run(args=(), **env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "FMJAX_ALLOCATOR", "FMJAX_ALLOCATOR_RESTARTED")}
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-c", PROGRAM, *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


@needs_tcmalloc
def test_restarts_once_with_tcmalloc_preloaded():
    lines = _run()
    assert lines[:2] == ["start", "start"]
    assert lines[2] == f"tcmalloc 1 {allocator.tcmalloc_library()}"


@needs_tcmalloc
def test_keeps_a_preload_already_set_and_adds_tcmalloc_in_front():
    lines = _run(LD_PRELOAD="libm.so.6")
    assert lines[:3] == ["start", "start", f"tcmalloc 1 {allocator.tcmalloc_library()}:libm.so.6"]


def test_system_malloc_when_asked():
    assert _run(FMJAX_ALLOCATOR="system")[:2] == ["start", "system None None"]


@needs_tcmalloc
def test_no_restart_when_tcmalloc_is_already_loaded():
    library = allocator.tcmalloc_library()
    assert _run(LD_PRELOAD=library)[:2] == ["start", f"tcmalloc None {library}"]


def test_a_library_that_fails_to_preload_restarts_once_and_runs_on():
    # the dynamic loader ignores a preload it cannot find, so the restarted process still
    # runs on the system's malloc and must not restart again
    lines = _run(["libfmjax_missing_allocator.so"])
    assert lines[:3] == ["start", "start", "system 1 libfmjax_missing_allocator.so"]


@pytest.mark.parametrize("choice", ["auto", "system"])
def test_the_command_line_reports_the_allocator_it_runs_with(choice):
    if choice == "auto" and allocator.tcmalloc_library() is None:
        pytest.skip("libtcmalloc is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FMJAX_ALLOCATOR_RESTARTED", "XLA_FLAGS")}
    env["FMJAX_ALLOCATOR"] = choice
    result = subprocess.run([sys.executable, "-m", "fmjax.cli", "--devices", "1", "info"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"allocator {'tcmalloc' if choice == 'auto' else 'system'}" in result.stdout.splitlines()
    assert "backend cpu: 1 device(s)" in result.stdout
