"""`fmjax info`: versions, devices and the memory allocator this process runs with."""
from __future__ import annotations

__all__ = ["main"]


def main(args) -> None:
    import flax
    import jax
    import jaxlib

    import fmjax
    from fmjax.app.allocator import loaded_allocator

    devices = jax.local_devices()
    print(f"fmjax {fmjax.__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")
    print(f"backend {jax.default_backend()}: {len(devices)} device(s), {devices[0].device_kind}")
    print(f"allocator {loaded_allocator()}")
