"""Containers every reader returns."""
from __future__ import annotations

import dataclasses

import numpy as np

from fmjax.errors import DataError

__all__ = ["DataError", "Dataset", "Split", "normal_split"]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one category.

    images: uint8 [N, H, W, C] at the working resolution (C = 1 or 3).
    masks: uint8 [N, H, W] with values {0, 1} at the working resolution
      (all zero for normal images and for training splits).
    labels: int32 [N], the anomaly labels: 0 = normal, 1 = anomalous.
    class_ids: int32 [N], the category of each image (0 unless several categories are
      trained together; the class a class-conditional model is given).
    names: N relative ids, e.g. "test/crack/003" (used for output paths).
    defect_types: N strings, "good" for normal images.
    original_sizes: int32 [N, 2] (height, width) of each source image.
    full_masks: optional list of N uint8 {0, 1} masks at original size.
    groups: optional int32 [N]: images of one group may share source pixels (crops of one
      region of a photo), images of different groups share none. A hold-out
      (`fmjax.data.split_holdout`) takes whole groups, so the normals it keeps out are
      unseen by the network trained on the rest.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    names: tuple
    defect_types: tuple
    original_sizes: np.ndarray
    full_masks: list | None = None
    class_ids: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.class_ids is None:
            object.__setattr__(self, "class_ids", np.zeros(n, np.int32))
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}")
        for field in ("masks", "labels", "class_ids", "names", "defect_types", "original_sizes"):
            if len(getattr(self, field)) != n:
                raise DataError(f"split field {field!r} has {len(getattr(self, field))} entries for {n} images")
        if self.groups is not None and len(self.groups) != n:
            raise DataError(f"split field 'groups' has {len(self.groups)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "Split":
        """The split restricted to `index` (an int array or slice)."""
        index = np.arange(len(self))[index]
        pick = lambda seq: tuple(seq[i] for i in index)
        return Split(
            images=self.images[index],
            masks=self.masks[index],
            labels=self.labels[index],
            names=pick(self.names),
            defect_types=pick(self.defect_types),
            original_sizes=self.original_sizes[index],
            full_masks=None if self.full_masks is None else [self.full_masks[i] for i in index],
            class_ids=self.class_ids[index],
            groups=None if self.groups is None else self.groups[index],
        )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train (normal only) and test splits of one category."""

    name: str
    category: str
    train: Split
    test: Split


def normal_split(images: np.ndarray, names, original_sizes=None, groups=None) -> Split:
    """A split of normal images only (zero masks, label 0); groups as in `Split`."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    if original_sizes is None:
        original_sizes = np.tile(np.array([[h, w]], np.int32), (n, 1))
    return Split(
        images=images,
        masks=np.zeros((n, h, w), np.uint8),
        labels=np.zeros((n,), np.int32),
        names=tuple(names),
        defect_types=("good",) * n,
        original_sizes=np.asarray(original_sizes, np.int32),
        groups=None if groups is None else np.asarray(groups, np.int32),
    )
