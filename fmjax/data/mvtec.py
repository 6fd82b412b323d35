"""MVTec-AD: the 15 categories read from their folders, or through TFDS.

The extracted archive has the layout folder.py reads:

  ROOT/<category>/train/good/000.png ...
  ROOT/<category>/test/<defect or good>/000.png ...
  ROOT/<category>/ground_truth/<defect>/000_mask.png   (0 / 255)

Three categories (grid, screw, zipper) are grey-scale photos; the other twelve
are RGB. `load_mvtec` converts every category to 3 channels by default
(channels=3: grey values copied to R, G and B) so one model shape fits all
categories; channels=1 gives grey for every category, channels=0 keeps each
category as it is stored (see folder.load_folder).

`load_mvtec_tfds` reads the same data through a TensorFlow Datasets builder
(`MVTecAD`, in fmjax/data/tfds_builders.py, built from the extracted archive as
a manual download into ArrayRecord files) and returns arrays identical to
`load_mvtec`'s. Neither path needs TensorFlow.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from PIL import Image

from fmjax.data import folder
from fmjax.data.base import DataError, Dataset, Split, normal_split

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
              "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
GREY_CATEGORIES = ("grid", "screw", "zipper")
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")  # orientation carries no meaning


def check_category(category: str, known, root, dataset: str) -> None:
    """DataError unless `category` is in `known` or root/<category> is a folder (a custom category)."""
    if category in known or (root is not None and (pathlib.Path(root) / category).is_dir()):
        return
    where = f" and {pathlib.Path(root) / category} is not a folder" if root is not None else ""
    raise DataError(f"unknown {dataset} category {category!r}{where}: use one of {', '.join(known)}")


def load_mvtec(root, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of MVTec-AD extracted under `root` (ROOT/<category>/train/good ...).

    Returns Dataset(name="mvtec"): images uint8 [N, S, S, C] (bilinear resize,
    C = channels; 3 for all categories by default, so grey categories are
    replicated to RGB), test masks uint8 [N, S, S] in {0, 1} (nearest resize),
    test.full_masks at original size, names "train/good/<id>" and
    "test/<defect>/<id>", test sorted by (defect, file name). A category not in
    CATEGORIES is read if its folder exists.
    """
    check_category(category, CATEGORIES, root, "MVTec-AD")
    ds = folder.load_folder(root, category, image_size, channels)
    return dataclasses.replace(ds, name="mvtec")


# ----------------------------------------------------------------------------- shared readers
# Used by the VisA raw-archive reader and by both TFDS readers, so every path decodes
# and resizes exactly as folder.load_folder does (the same functions do the work).

def small_mask(full: np.ndarray, image_size: int) -> np.ndarray:
    """A binary mask uint8 [H, W] resized (nearest) to uint8 [S, S] in {0, 1}, as folder.load_folder does."""
    small = Image.fromarray(full).resize((image_size, image_size), Image.NEAREST)
    return (np.asarray(small) > 0).astype(np.uint8)


def read_items(items, image_size: int, channels: int, train: bool) -> Split:
    """A split from `items`, decoded and resized exactly like folder.load_folder.

    items: sequence of (name, defect, image, mask) where image is a path or a
    binary file object holding an encoded image, and mask is None (normal: an
    all-zero mask) or a path / file object holding a mask (binarised > 0).
    channels: 1 or 3. train=True returns a normal-only split (label 0) without
    masks; otherwise images uint8 [N, S, S, C], masks uint8 [N, S, S],
    labels (defect != "good"), full_masks at original size.
    """
    n = len(items)
    images = np.zeros((n, image_size, image_size, channels), np.uint8)
    sizes = np.zeros((n, 2), np.int32)
    for i, (_, _, image, _) in enumerate(items):
        images[i], sizes[i] = folder._read(image, image_size, channels)
    names = tuple(name for name, _, _, _ in items)
    if train:
        return normal_split(images, names, sizes)
    masks = np.zeros((n, image_size, image_size), np.uint8)
    full_masks = []
    for i, (_, _, image, mask) in enumerate(items):
        if mask is None:
            full_masks.append(np.zeros(tuple(sizes[i]), np.uint8))
            continue
        full = folder._read_mask(mask)
        if full.shape != tuple(sizes[i]):
            raise DataError(f"mask {mask} is {full.shape[1]}x{full.shape[0]} (WxH) but image {image} is "
                            f"{sizes[i][1]}x{sizes[i][0]}: masks must match their image size")
        masks[i] = small_mask(full, image_size)
        full_masks.append(full)
    defects = tuple(defect for _, defect, _, _ in items)
    return Split(
        images=images,
        masks=masks,
        labels=np.array([d != "good" for d in defects], np.int32).reshape(n),
        names=names,
        defect_types=defects,
        original_sizes=sizes,
        full_masks=full_masks,
    )


# ----------------------------------------------------------------------------- TFDS

def load_mvtec_tfds(data_dir, manual_dir, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of MVTec-AD through the TFDS builder `MVTecAD`, without TensorFlow.

    Builds data_dir/mvtec_ad/<category>/<version>/ (ArrayRecord files) from the
    extracted archive in manual_dir (manual_dir/<category>/train/good ...) if it
    is not built yet (manual_dir may be None once it is), then reads it with
    `builder.as_data_source`. The arrays, names and masks are identical to
    `load_mvtec(manual_dir, category, image_size, channels)`; channels=0 decides
    grey from the first training image (all three stored channels equal).
    """
    from fmjax.data import tfds_builders  # late import: TFDS is only needed here

    ds = tfds_builders.load(tfds_builders.MVTecAD, data_dir, manual_dir, category, image_size, channels)
    return dataclasses.replace(ds, name="mvtec")


def __getattr__(name):
    # `mvtec.MVTecAD` is the TFDS builder; importing TFDS is deferred until it is asked for.
    if name == "MVTecAD":
        from fmjax.data import tfds_builders

        return tfds_builders.MVTecAD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
