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

`fmjax.data.tfds.load_mvtec_tfds` reads the same data through a TensorFlow Datasets
builder and returns arrays identical to `load_mvtec`'s.
"""
from __future__ import annotations

import dataclasses
import pathlib

from fmjax.data import folder
from fmjax.data.base import DataError, Dataset
from fmjax.files import plain_name

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
              "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
GREY_CATEGORIES = ("grid", "screw", "zipper")
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")  # orientation carries no meaning


def check_category(category: str, known, root, dataset: str) -> None:
    """DataError unless `category` is in `known` or root/<category> is a folder (a custom
    category); a category must be a plain name either way."""
    plain_name(category, "--category")
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
