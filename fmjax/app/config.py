"""`fmjax config show`: print the resolved config (preset, then --config file, then --set)
as JSON, the layout of a run's config.json and of `--config` files."""
from __future__ import annotations

from fmjax.config import build

__all__ = ["main"]


def main(args) -> None:
    print(build(args.preset, args.method, args.set, args.config).to_json())
