"""Method name -> the package that implements it: one line per method.

A method package holds `settings.py` (its `Settings` dataclass, `PRESETS`, `NEUTRAL`,
`TRAINING`, `validate(config)`, optionally `WRITTEN_BEFORE`; pure Python, so the config
can read it without JAX) and `method.py` (`METHOD`, an instance of
`fmjax.methods.base.Method`). Both are imported by name when first asked for, so nothing
here imports a method's code.
"""
from __future__ import annotations

import importlib

from fmjax.errors import ConfigError

__all__ = ["METHODS", "get", "names", "settings_class", "settings_for", "settings_module", "written_before"]

METHODS = {
    "flow_mismatch": "fmjax.methods.flow_mismatch",
    "radar": "fmjax.methods.radar",
    "recon": "fmjax.methods.recon",
}


def names() -> tuple:
    return tuple(METHODS)


def _package(name: str) -> str:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def settings_module(name: str):
    """The pure-Python settings module of method `name`."""
    return importlib.import_module(_package(name) + ".settings")


def settings_class(name: str) -> type:
    """The frozen dataclass of method `name`'s scoring settings (the config's `score`)."""
    return settings_module(name).Settings


def settings_for(name: str, preset: str = ""):
    """Method `name`'s settings for preset `preset` (its defaults when it has none for it)."""
    module = settings_module(name)
    return module.PRESETS.get(preset, module.Settings())


def written_before(name: str) -> dict:
    """Method `name`'s settings whose default changed after they were added, at the value a
    config.json written before they existed scored with (`WRITTEN_BEFORE`; {} if none)."""
    return dict(getattr(settings_module(name), "WRITTEN_BEFORE", {}))


def get(name: str):
    """The `Method` object of method `name` (imports its code)."""
    return importlib.import_module(_package(name) + ".method").METHOD
