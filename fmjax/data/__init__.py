"""Data readers. Each returns a `Dataset` of uint8 numpy arrays (see base.py).

`load(spec, category, data_config, textures_config)` is the one entry point the CLI
uses; spec is textures:NAME | folder:ROOT | mvtec:ROOT | visa:ROOT | fashion_mnist:CLASS
| tfds:mvtec_ad | tfds:visa.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from fmjax.data.base import DataError, Dataset, Split, normal_split

__all__ = ["DataError", "Dataset", "Split", "categories_of", "holdout_count", "load", "load_all", "normal_split",
           "orientation_free", "parse_spec", "split_halves", "split_holdout", "stratified_subset", "unified_train"]

KINDS = ("textures", "folder", "mvtec", "visa", "fashion_mnist", "tfds")


def parse_spec(spec: str):
    """'kind:value' -> (kind, value), checked against the known kinds."""
    kind, sep, value = spec.partition(":")
    if not sep or not value or kind not in KINDS:
        raise DataError(f"bad --data {spec!r}: use one of " + ", ".join(f"{k}:..." for k in KINDS))
    return kind, value


def load(spec: str, category: str | None, config, textures_config=None) -> Dataset:
    """Reads one category of the dataset named by `spec` at config.image_size
    (`config`: a DataConfig; `textures_config`: the TexturesConfig of textures:NAME data,
    default its defaults)."""
    kind, value = parse_spec(spec)
    if kind == "textures":
        from fmjax.config import TexturesConfig
        from fmjax.data import textures

        if category not in (None, value):
            raise DataError(f"--category {category!r} contradicts --data {spec!r}; drop --category")
        return textures.load_textures(value, config.image_size, textures_config or TexturesConfig())
    if kind == "fashion_mnist":
        from fmjax.data import fashion_mnist

        if category is not None and fashion_mnist.class_index(category) != fashion_mnist.class_index(value):
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
    if kind == "tfds":
        from fmjax.data import tfds

        return tfds.load_prepared(value, category, config.image_size, config.channels or 3)
    from fmjax.data import folder

    return folder.load_folder(value, category, config.image_size, config.channels, image_level=True)


def orientation_free(spec: str, categories) -> bool:
    """Whether flipped normal images of these categories are still normal: true for
    textures (the embedded ones, MVTec-AD's five), false for objects and unknown folders,
    whose defects can be a flip (MVTec's metal_nut "flip") or a misplacement."""
    kind, _ = parse_spec(spec)
    if kind == "textures":
        return True
    if kind == "mvtec" or spec == "tfds:mvtec_ad":
        from fmjax.data import mvtec

        return bool(categories) and all(c in mvtec.TEXTURE_CATEGORIES for c in categories)
    return False


# From this many training images on, at least two are held out (where `minimum` allows
# two): one to fit normalisation statistics and one to fit thresholds; three quarters
# or more still train.
SMALL_SET = 8


def holdout_count(num_images: int, fraction: float, minimum: int = 0) -> int:
    """How many of `num_images` normal training images are held out: round(fraction * N),
    but at least min(minimum, N - minimum), and at least min(minimum, 2) of 8 or more
    (none when fraction is 0)."""
    if fraction <= 0:
        return 0
    small_set_floor = min(minimum, 2) if num_images >= SMALL_SET else 0
    return max(int(round(fraction * num_images)), min(minimum, num_images - minimum), small_set_floor)


def split_holdout(train: Split, fraction: float, seed: int, minimum: int = 0):
    """(fit, holdout): `holdout_count(len(train), fraction, minimum)` normal training images
    drawn at random (from `seed`) and held out for fitting thresholds on normal images only.
    holdout is None when fraction is 0. A split with `groups` holds out whole groups (in a
    random order from `seed`) until it has at least that many images, and at least two of
    three or more: no held-out image shares source pixels with an image trained on, and
    `split_halves` can cut the hold-out into halves that share none either."""
    n_hold = holdout_count(len(train), fraction, minimum)
    if n_hold == 0:
        return train, None
    if n_hold >= len(train):
        raise DataError(f"calibration.holdout_fraction {fraction} leaves no training images out of {len(train)}")
    rng = np.random.default_rng([seed, 7])
    if train.groups is None:
        held = rng.permutation(len(train))[:n_hold]
    else:
        names = rng.permutation(np.unique(train.groups))
        counts = np.array([np.sum(train.groups == g) for g in names])
        taken = int(np.searchsorted(np.cumsum(counts), n_hold)) + 1
        taken = max(taken, 2) if len(names) >= 3 else taken
        if taken >= len(names):
            raise DataError(f"calibration.holdout_fraction {fraction} holds out {n_hold} of {len(train)} training "
                            f"images, which takes all {len(names)} groups of images that share no source pixels: "
                            f"lower it")
        held = np.flatnonzero(np.isin(train.groups, names[:taken]))
    kept = np.setdiff1d(np.arange(len(train)), held)
    return train.subset(kept), train.subset(np.sort(held))


def split_halves(holdout: Split) -> tuple[Split, Split]:
    """(A, B): a hold-out cut in two, A to fit statistics, B to set thresholds or to
    validate on. Without groups, the first len // 2 images and the rest. With two or more
    groups, whole groups (in the order they first appear) until A has at least len // 2
    images, so that no image of B shares source pixels with one of A: crops of one region
    that fitted per-pixel statistics would otherwise read as more normal than new ones."""
    half = len(holdout) // 2
    if holdout.groups is not None:
        _, first = np.unique(holdout.groups, return_index=True)
        order = holdout.groups[np.sort(first)]
        if len(order) >= 2:
            counts = np.array([np.sum(holdout.groups == g) for g in order])
            taken = min(int(np.searchsorted(np.cumsum(counts), half)) + 1, len(order) - 1)
            in_a = np.isin(holdout.groups, order[:taken])
            return holdout.subset(np.flatnonzero(in_a)), holdout.subset(np.flatnonzero(~in_a))
    return holdout.subset(slice(0, half)), holdout.subset(slice(half, None))


def stratified_subset(split: Split, limit: int, seed: int = 0) -> Split:
    """`limit` images of `split`, each defect type (class) keeping its share (largest
    remainders), kept in the split's order; the whole split when limit is 0 or not smaller.

    Each group takes its first images in one fixed random order of the split, so splits of
    the same images with renamed groups (the one-class protocols) give the same subset.
    """
    if not 0 < limit < len(split):
        return split
    order = np.random.default_rng([seed, 11]).permutation(len(split))
    kinds = np.asarray(split.defect_types)[order]
    names, counts = np.unique(kinds, return_counts=True)
    exact = limit * counts / len(split)
    take = np.floor(exact).astype(int)
    take[np.argsort(take - exact, kind="stable")[:limit - take.sum()]] += 1
    chosen = np.concatenate([order[kinds == name][:n] for name, n in zip(names, take)])
    return split.subset(np.sort(chosen))


def categories_of(spec: str) -> list[str]:
    """The categories under a folder/mvtec/visa root, sorted (the class ids of `--category all`)."""
    kind, root = parse_spec(spec)
    if kind not in ("folder", "mvtec", "visa"):
        raise DataError(f"--category all needs folder:, mvtec: or visa: data, not {spec!r}")
    from fmjax.data import folder

    if kind == "visa" and os.path.isdir(root) and not folder.list_categories(root):
        from fmjax.data import visa

        return [c for c in visa.CATEGORIES if os.path.isdir(os.path.join(root, c))]
    cats = folder.list_categories(root)
    if not cats:
        raise DataError(f"no category folder with train/good under {root}")
    return cats


def load_all(spec: str, config, categories=None) -> list[Dataset]:
    """Every category of `spec` (or the given ones) at one channel count: when grey and
    colour categories mix and config.channels is 0, grey ones are read as 3 channels."""
    categories = categories or categories_of(spec)
    datasets = [load(spec, c, config) for c in categories]
    if len({d.train.images.shape[-1] for d in datasets}) > 1:
        if config.channels:
            raise DataError(f"categories of {spec} have different channel counts at data.channels={config.channels}")
        rgb = dataclasses.replace(config, channels=3)
        datasets = [d if d.train.images.shape[-1] == 3 else load(spec, d.category, rgb) for d in datasets]
    return datasets


def unified_train(datasets) -> Split:
    """All categories' training images in one split whose `class_ids` are the category
    indices (the class ids a class-conditional model is trained with); groups stay apart
    across categories."""
    parts = [d.train for d in datasets]
    groups = None
    if all(p.groups is not None for p in parts):
        offsets = np.cumsum([0] + [int(p.groups.max()) + 1 if len(p) else 0 for p in parts])
        groups = np.concatenate([p.groups + o for p, o in zip(parts, offsets)])
    return Split(
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        class_ids=np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]),
        names=tuple(f"{d.category}/{n}" for d, p in zip(datasets, parts) for n in p.names),
        defect_types=tuple(t for p in parts for t in p.defect_types),
        original_sizes=np.concatenate([p.original_sizes for p in parts]),
        groups=groups,
    )
