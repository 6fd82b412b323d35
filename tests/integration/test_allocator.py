"""`fmjax.app.allocator`: a program restarts itself once with tcmalloc where it is
installed, says so on stderr, never loops, hands its children the environment it was
started with, and keeps the system's malloc when asked to; the command line does the
same through `fmjax.app.launch.start`."""
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from fmjax.app import allocator

needs_tcmalloc = pytest.mark.skipif(allocator.tcmalloc_library() is None,
                                    reason="libtcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
NOTE = "fmjax: running with tcmalloc"

# prints "start" each time the program begins, then the allocator it runs with and the
# environment a child process would get
PROGRAM = """
import os, sys
from fmjax.app import allocator
print("start", flush=True)
if len(sys.argv) > 1:
    allocator.tcmalloc_library = lambda: sys.argv[1]
allocator.use_tcmalloc()
print(allocator.loaded_allocator(), os.environ.get("FMJAX_ALLOCATOR_RESTARTED"), os.environ.get("LD_PRELOAD"))
"""


def _run(args=(), **env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "FMJAX_ALLOCATOR", "FMJAX_ALLOCATOR_RESTARTED")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-c", PROGRAM, *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n"), result.stderr


@needs_tcmalloc
def test_restarts_once_says_so_and_keeps_the_preload_from_children():
    lines, err = _run()
    assert lines[:3] == ["start", "start", "tcmalloc None None"]
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith(NOTE)] and NOTE in err


@needs_tcmalloc
def test_a_preload_already_set_is_handed_on():
    lines, _ = _run(LD_PRELOAD="libm.so.6")
    assert lines[:3] == ["start", "start", "tcmalloc None libm.so.6"]


def test_system_malloc_when_asked():
    lines, err = _run(FMJAX_ALLOCATOR="system")
    assert lines[:2] == ["start", "system None None"] and NOTE not in err


@needs_tcmalloc
def test_no_restart_when_tcmalloc_is_already_loaded():
    library = allocator.tcmalloc_library()
    lines, _ = _run(LD_PRELOAD=library)
    assert lines[:2] == ["start", f"tcmalloc None {library}"]


def test_a_library_that_fails_to_preload_restarts_once_and_runs_on():
    # the dynamic loader ignores a preload it cannot find, so the restarted process still
    # runs on the system's malloc and must not restart again
    lines, err = _run(["libfmjax_missing_allocator.so"])
    assert lines[:3] == ["start", "start", "system None None"] and NOTE not in err


@pytest.mark.parametrize("choice", ["auto", "system"])
def test_the_command_line_reports_the_allocator_it_runs_with(choice):
    if choice == "auto" and allocator.tcmalloc_library() is None:
        pytest.skip("libtcmalloc is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FMJAX_ALLOCATOR_RESTARTED", "XLA_FLAGS")}
    env["FMJAX_ALLOCATOR"] = choice
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "fmjax.app.cli", "--devices", "1", "info"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"allocator {'tcmalloc' if choice == 'auto' else 'system'}" in result.stdout.splitlines()
    assert "backend cpu: 1 device(s)" in result.stdout
    assert (NOTE in result.stderr) == (choice == "auto")
