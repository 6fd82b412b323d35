import os

# Two host devices (this must happen before jax is imported) so multi-device code paths
# run in every test session.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    from helpers import FAST_COMPILE_FLAGS  # noqa: E402

    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """After the last test, drop JAX's garbage-collection hook (it frees XLA buffers at
    every full collection). A pytest-xdist worker still busy 5 s after the session ends is
    stopped by an interrupt of its main thread (execnet's interrupt_main); landing in that
    hook, a long XLA collection, it printed an ignored KeyboardInterrupt."""
    import gc

    gc.callbacks[:] = [hook for hook in gc.callbacks if getattr(hook, "__name__", "") != "_xla_gc_callback"]


@pytest.fixture(scope="session", autouse=True)
def _persistent_compile_cache(tmp_path_factory):
    """Same config and shapes -> same XLA program: compile it once per test session
    (every run loaded from disk builds a fresh jit, so without this each one recompiles)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
