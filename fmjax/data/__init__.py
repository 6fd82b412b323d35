"""Data readers. Each returns a `Dataset` of uint8 numpy arrays (see base.py).

`load(spec, category, data_config)` is the one entry point the CLI uses; spec is
textures:NAME | folder:ROOT | mvtec:ROOT | visa:ROOT | fashion_mnist:CLASS.
"""
from __future__ import annotations

import numpy as np

from fmjax.data.base import DataError, Dataset, Split, normal_split

__all__ = ["DataError", "Dataset", "Split", "normal_split", "load", "parse_spec", "split_holdout"]

KINDS = ("textures", "folder", "mvtec", "visa", "fashion_mnist")


def parse_spec(spec: str):
    """'kind:value' -> (kind, value), checked against the known kinds."""
    kind, sep, value = spec.partition(":")
    if not sep or not value or kind not in KINDS:
        raise DataError(f"bad --data {spec!r}: use one of " + ", ".join(f"{k}:..." for k in KINDS))
    return kind, value


def load(spec: str, category: str | None, config) -> Dataset:
    """Reads one category of the dataset named by `spec` at config.image_size (DataConfig)."""
    kind, value = parse_spec(spec)
    if kind == "textures":
        from fmjax.data import textures

        if category not in (None, value):
            raise DataError(f"--category {category!r} contradicts --data {spec!r}; drop --category")
        return textures.load_textures(value, config)
    if kind == "fashion_mnist":
        from fmjax.data import fashion_mnist

        if category not in (None, value):
            raise DataError(f"--category {category!r} contradicts --data {spec!r}; drop --category")
        return fashion_mnist.load_fashion_mnist(value, config.image_size)
    if not category:
        raise DataError(f"--data {spec} needs --category NAME (one of the folders under {value})")
    if kind == "mvtec":
        from fmjax.data import mvtec

        return mvtec.load_mvtec(value, category, config.image_size, config.channels or 3)
    if kind == "visa":
        from fmjax.data import visa

        return visa.load_visa(value, category, config.image_size, config.channels or 3)
    from fmjax.data import folder

    return folder.load_folder(value, category, config.image_size, config.channels)


def split_holdout(train: Split, fraction: float, seed: int):
    """(fit, holdout): a random `fraction` of the normal training images held out for
    fitting thresholds on normal images only. holdout is None when fraction is 0."""
    n_hold = int(round(fraction * len(train)))
    if n_hold == 0:
        return train, None
    if n_hold >= len(train):
        raise DataError(f"data.holdout_fraction {fraction} leaves no training images out of {len(train)}")
    order = np.random.default_rng([seed, 7]).permutation(len(train))
    return train.subset(np.sort(order[n_hold:])), train.subset(np.sort(order[:n_hold]))
