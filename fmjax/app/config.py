"""`fmjax config show`: print the resolved config (preset, then --config file, then --set)
as JSON, the layout of a run's config.json and of `--config` files."""
from __future__ import annotations

from fmjax.config import AUTO, build
from fmjax.errors import ConfigError

__all__ = ["main"]


def main(args) -> None:
    from fmjax.app.train import preset_name, resolve_auto

    if preset_name(args) != AUTO:
        config = build(preset_name(args), args.method, args.set, args.config)
    elif args.data:
        config = resolve_auto(args.data, args.category, args.method, args.set, args.config)[0]
    else:
        raise ConfigError("the auto preset is chosen from the training images: pass --data (and --category), "
                          "or --preset NAME")
    print(config.to_json())
