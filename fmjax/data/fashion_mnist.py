"""Fashion-MNIST in the one-class protocol, read from the original IDX gzip files.

The Debian package dataset-fashion-mnist installs the four original files in
DEFAULT_DIR; the environment variable FMJAX_FASHION_MNIST_DIR, or the data_dir
argument, points to any other folder holding them (gzipped or not):

  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60,000 images
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10,000 images

One-class protocol for class c: train = every training image of class c
(6,000), test = every test image (10,000; label 1 = any class but c, so 1,000
are normal). There are no pixel masks (masks are all zero, full_masks None).
"""
from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np
from PIL import Image

from fmjax.data.base import DataError, Dataset, Split, normal_split

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FMJAX_FASHION_MNIST_DIR"
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SOURCE_SIZE = 28
PADDED_SIZE = 32
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes: images uint8 [N, H, W] or labels uint8 [N].

    Checks the magic number (2051 images, header 16 bytes: magic, N, H, W as
    big-endian int32; 2049 labels, header 8 bytes: magic, N) and that the file
    holds exactly the announced number of bytes; DataError otherwise.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path} ({' '.join(str(err).split())}): "
                        f"download or install it again") from None
    if len(raw) < 8:
        raise DataError(f"IDX file {path} is truncated ({len(raw)} bytes, no header): download or install it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic == IMAGES_MAGIC:
        header = 16
        if len(raw) < header:
            raise DataError(f"IDX file {path} is truncated ({len(raw)} bytes, header needs 16): "
                            f"download or install it again")
        shape = tuple(int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    elif magic == LABELS_MAGIC:
        header = 8
        shape = (int.from_bytes(raw[4:8], "big"),)
    else:
        raise DataError(f"IDX file {path} has magic number {magic}, not {IMAGES_MAGIC} (images) or {LABELS_MAGIC} "
                        f"(labels): pass an unsigned-byte IDX file such as {FILES['train_images']}.gz")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        kind = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {kind} ({len(raw) - header} data bytes for shape {shape}, expected "
                        f"{expected}): download or install it again")
    return np.frombuffer(raw, np.uint8, count=expected, offset=header).reshape(shape).copy()


def resolve_dir(path=None) -> pathlib.Path:
    """The folder to read: `path`, else $FMJAX_FASHION_MNIST_DIR, else DEFAULT_DIR."""
    return pathlib.Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _file(folder: pathlib.Path, key: str) -> pathlib.Path:
    for name in (FILES[key] + ".gz", FILES[key]):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST file {folder / (FILES[key] + '.gz')} not found: install the Debian package "
                    f"dataset-fashion-mnist, or set {ENV_VAR} to a folder holding the four IDX files")


def class_index(cls) -> int:
    """Class index 0-9 from an int, a digit string or a class name (see CLASSES)."""
    if isinstance(cls, (int, np.integer)) and not isinstance(cls, bool) and 0 <= cls < len(CLASSES):
        return int(cls)
    if isinstance(cls, str):
        text = cls.strip().lower()
        if text.isdigit() and int(text) < len(CLASSES):
            return int(text)
        if text in CLASSES:
            return CLASSES.index(text)
    raise DataError(f"unknown Fashion-MNIST class {cls!r}: use 0-9 or one of {', '.join(CLASSES)}")


def _read_pair(folder: pathlib.Path, split: str):
    images_path, labels_path = _file(folder, f"{split}_images"), _file(folder, f"{split}_labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise DataError(f"{images_path} holds {images.shape} data, not 28x28 images: "
                        f"pass the Fashion-MNIST image file ({FILES[split + '_images']}.gz)")
    if labels.ndim != 1:
        raise DataError(f"{labels_path} holds {labels.shape} data, not labels: "
                        f"pass the Fashion-MNIST label file ({FILES[split + '_labels']}.gz)")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels: "
                        f"use files from the same release")
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataError(f"{labels_path} has label {labels.max()}, outside 0-9: pass the Fashion-MNIST label file")
    return images, labels


def to_working_size(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, S, S, 1]: zero-padded by 2 pixels per side to 32x32, then resized
    (bilinear) to S x S if S != 32, so every working size shows the same padded frame."""
    pad = (PADDED_SIZE - SOURCE_SIZE) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    if image_size == PADDED_SIZE:
        return padded[..., None]
    out = np.zeros((len(images), image_size, image_size, 1), np.uint8)
    for i, x in enumerate(padded):
        out[i, ..., 0] = np.asarray(Image.fromarray(x).resize((image_size, image_size), Image.BILINEAR))
    return out


def load_fashion_mnist(cls, image_size: int = 32, data_dir=None, num_test: int | None = None) -> Dataset:
    """Fashion-MNIST one-class task for class `cls` (0-9 or a name from CLASSES).

    Returns Dataset(name="fashion_mnist", category=<class name>):
      train: every training image of class cls, in file order, named "train/<class>/<index>";
      test: the test images (all 10,000, or the first num_test), named
        "test/<true class>/<index>", label 1 for any other class, defect type
        "good" or the true class name.
    Images uint8 [N, S, S, 1]: the 28x28 grey images zero-padded to 32x32 and,
    if image_size != 32, resized bilinearly to S. Masks are all zero (image-level
    labels only), full_masks None, and original_sizes (32, 32): the padded frame
    is the image's geometry, so maps are never cropped back to 28x28.
    <index> is the image's 5-digit position in its IDX file.
    """
    index = class_index(cls)
    name = CLASSES[index]
    if int(image_size) < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    if num_test is not None and (not isinstance(num_test, (int, np.integer)) or isinstance(num_test, bool)
                                 or num_test < 1):
        raise DataError(f"num_test must be None (all test images) or >= 1, got {num_test}")
    folder = resolve_dir(data_dir)
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} not found: install the Debian package "
                        f"dataset-fashion-mnist, or set {ENV_VAR} to a folder holding the four IDX files")
    train_images, train_labels = _read_pair(folder, "train")
    test_images, test_labels = _read_pair(folder, "test")
    (picked,) = np.nonzero(train_labels == index)
    if not len(picked):
        raise DataError(f"{_file(folder, 'train_labels')} has no images of class {index} ({name}): "
                        f"use the full Fashion-MNIST training files")
    if num_test is not None:
        test_images, test_labels = test_images[:int(num_test)], test_labels[:int(num_test)]
    if not len(test_labels):
        raise DataError(f"{_file(folder, 'test_images')} has no images: use the full Fashion-MNIST test files")
    s = int(image_size)
    train = normal_split(to_working_size(train_images[picked], s), [f"train/{name}/{i:05d}" for i in picked],
                         np.full((len(picked), 2), PADDED_SIZE, np.int32))
    n = len(test_labels)
    test = Split(
        images=to_working_size(test_images, s),
        masks=np.zeros((n, s, s), np.uint8),
        labels=(test_labels != index).astype(np.int32),
        names=tuple(f"test/{CLASSES[y]}/{i:05d}" for i, y in enumerate(test_labels)),
        defect_types=tuple("good" if y == index else CLASSES[y] for y in test_labels),
        original_sizes=np.full((n, 2), PADDED_SIZE, np.int32),
    )
    return Dataset(name="fashion_mnist", category=name, train=train, test=test)
