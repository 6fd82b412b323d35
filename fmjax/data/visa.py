"""VisA (Visual Anomaly dataset): 12 categories, from either of its two layouts.

Converted layout (MVTec-like, as written by the official preparation script;
ROOT is its <save folder>/1cls):

  ROOT/<category>/train/good/*.JPG
  ROOT/<category>/test/{good,bad}/*.JPG
  ROOT/<category>/ground_truth/bad/<id>.png

Raw archive layout, with the official one-class split file:

  ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG
  ROOT/<category>/Data/Masks/Anomaly/*.png
  ROOT/split_csv/1cls.csv   columns object,split,label,image,mask
                            (split train/test, label normal/anomaly,
                            paths relative to ROOT, mask empty for normal images)

VisA masks hold class ids (0 background, 1, 2, ... defect instances); both
layouts binarise them (> 0). Both give the same Dataset: defect types "good"
and "bad", names "train/good/<id>", "test/good/<id>", "test/bad/<id>", test
sorted by (defect, file name), images resized bilinearly, masks nearest, the
binarised masks kept at original size in test.full_masks.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib

from fmjax.data import folder
from fmjax.data.base import DataError, Dataset
from fmjax.data.folder import read_items
from fmjax.data.mvtec import check_category
from fmjax.files import plain_name

CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
              "pcb3", "pcb4", "pipe_fryum")
SPLIT_CSV = "split_csv/1cls.csv"
_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": "good", "anomaly": "bad"}


def layout(root, category: str) -> str:
    """"folder" (ROOT/<category>/train/good exists) or "raw" (ROOT/split_csv/1cls.csv exists); else DataError."""
    root = pathlib.Path(root)
    plain_name(category, "--category")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass the folder that holds the VisA category folders")
    if (root / category / "train" / "good").is_dir():
        return "folder"
    if (root / SPLIT_CSV).is_file():
        return "raw"
    check_category(category, CATEGORIES, root, "VisA")
    raise DataError(f"no VisA data for {category!r} under {root}: expected {root / category / 'train' / 'good'} "
                    f"(converted layout) or {root / SPLIT_CSV} (raw archive layout)")


def raw_items(root, category: str):
    """(train_items, test_items) of `category` in the raw archive layout, from ROOT/split_csv/1cls.csv.

    Items are (name, defect, image path, mask path or None), ordered like
    folder.load_folder: train by file name, test by (defect, file name).
    Checks that every listed file exists; DataError naming the csv line otherwise.
    """
    root = pathlib.Path(root)
    csv_path = root / SPLIT_CSV
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read split file {csv_path} ({folder._one_line(err)}): "
                        f"restore it from the VisA archive") from None
    missing = [c for c in _CSV_COLUMNS if c not in header]
    if missing:
        raise DataError(f"split file {csv_path} lacks column(s) {', '.join(missing)}: "
                        f"use the official VisA split_csv/1cls.csv (columns {','.join(_CSV_COLUMNS)})")
    objects = sorted({(row["object"] or "").strip() for row in rows})
    train, test = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if (row["object"] or "").strip() != category:
            continue
        where = f"split file {csv_path} line {line}"
        split = (row["split"] or "").strip().lower()
        label = (row["label"] or "").strip().lower()
        if split not in ("train", "test"):
            raise DataError(f"{where}: split {row['split']!r} is not train or test: fix the row")
        if label not in _LABELS:
            raise DataError(f"{where}: label {row['label']!r} is not normal or anomaly: fix the row")
        if split == "train" and label != "normal":
            raise DataError(f"{where}: anomalous image in the train split: one-class training needs normal "
                            f"images only, fix the row")
        image = root / (row["image"] or "").strip()
        if not (row["image"] or "").strip() or not image.is_file():
            raise DataError(f"{where}: image {image} not found: extract the VisA archive into {root}")
        mask = None
        if label == "anomaly":
            mask_text = (row["mask"] or "").strip()
            mask = root / mask_text
            if not mask_text or not mask.is_file():
                raise DataError(f"{where}: mask {mask} of anomalous image {image} not found: "
                                f"extract the VisA archive into {root}")
        (train if split == "train" else test).append((_LABELS[label], image, mask))
    if not train and not test:
        raise DataError(f"split file {csv_path} has no rows for category {category!r} "
                        f"(objects: {', '.join(objects) or 'none'}): check the category name")
    if not train:
        raise DataError(f"split file {csv_path} has no train rows for {category!r}: "
                        f"use the official one-class split 1cls.csv")
    if not test:
        raise DataError(f"split file {csv_path} has no test rows for {category!r}: "
                        f"use the official one-class split 1cls.csv")
    train.sort(key=lambda item: item[1].name)
    test.sort(key=lambda item: (item[0], item[1].name))
    train_items = [(f"train/{d}/{p.stem}", d, p, m) for d, p, m in train]
    test_items = [(f"test/{d}/{p.stem}", d, p, m) for d, p, m in test]
    seen = {}
    for name, _, path, _ in train_items + test_items:
        if name in seen:
            raise DataError(f"images {seen[name]} and {path} both get the name {name!r}: "
                            f"rename one (ids must be unique per split and label)")
        seen[name] = path
    return train_items, test_items


def load_visa(root, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of VisA under `root`, in the converted or the raw archive layout.

    Returns Dataset(name="visa"): images uint8 [N, S, S, C] (C = channels, 3
    by default; 0: grey when every training image is, else RGB
    (`folder.channels_of`); 1 converts to grey),
    test masks uint8 [N, S, S] in {0, 1}, labels 1 for "bad", full_masks at
    original size. A mask whose size differs from its image's is a DataError.
    """
    folder._check_channels(channels)
    folder._check_size(image_size)
    if layout(root, category) == "folder":
        return dataclasses.replace(folder.load_folder(root, category, image_size, channels), name="visa")
    train_items, test_items = raw_items(root, category)
    if channels == 0:
        channels = folder.channels_of([item[2] for item in train_items], f"VisA category {category}",
                                      [item[2] for item in test_items])
    train = read_items(train_items, image_size, channels, train=True)
    test = read_items(test_items, image_size, channels, train=False)
    return Dataset(name="visa", category=category, train=train, test=test)
