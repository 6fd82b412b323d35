"""Datasets in MVTec-AD folder layout, and arbitrary image files for prediction.

Layout of one category:

  ROOT/<category>/train/good/*.png|jpg|bmp|tif
  ROOT/<category>/test/<defect or good>/*
  ROOT/<category>/ground_truth/<defect>/<id>_mask.png   (or <id>.png; 0 / 255)

The normal folders may be called "ok" instead of "good" (BTAD's layout: train/ok,
test/ok, test/ko); either way normal test images get the defect type "good".

Images are resized to the working resolution as they are read, so full-size
images are never kept; only the binarised full-size masks are (uint8 {0, 1}),
for evaluation at the original resolution.
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from fmjax.data.base import DataError, Dataset, Split, normal_split
from fmjax.errors import warn
from fmjax.files import inside, plain_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_FOLDERS = ("good", "ok")  # MVTec-AD, VisA converted, MPDD | BTAD
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _is_image(path: pathlib.Path) -> bool:
    # hidden files (e.g. "._x.png" written by macOS archivers) are not images
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _open(path: pathlib.Path) -> Image.Image:
    """The fully decoded image at `path`; DataError naming the file if it can't be read."""
    try:
        image = Image.open(path)
        image.load()
    except _ERRORS as err:
        raise DataError(f"cannot read image {path} ({_one_line(err)}): replace or remove the file") from None
    return image


def _is_grey(image: Image.Image) -> bool:
    """Whether a PIL image has no colour: grey modes, or a palette of greys only."""
    if image.mode in _GREY_MODES:
        return True
    if image.mode in ("P", "PA"):
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """`image` as 8-bit "L" (channels 1) or "RGB" (channels 3).

    16-bit and 32-bit integer images are scaled from [0, 65535]; float images
    from [0, 1] if their maximum is at most 1, else clipped to [0, 255]. Alpha
    is dropped; palettes are expanded.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        else:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8))
    elif mode in ("P", "PA"):
        image = image.convert("RGBA").convert("RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if channels == 1:
        return image.convert("L")
    return image.convert("RGB")


def _check_channels(channels: int) -> None:
    if channels not in (0, 1, 3):
        raise DataError(f"channels must be 0 (from the data), 1 (grey) or 3 (RGB), got {channels}")


def _check_size(image_size: int) -> None:
    if int(image_size) < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")


def _grey_file(image) -> bool:
    """Whether the image file (a path or a binary file object, rewound after) is grey;
    only its header is read, but for palette images."""
    try:
        with Image.open(image) as opened:
            return _is_grey(opened)
    except _ERRORS as err:
        raise DataError(f"cannot read image {image} ({_one_line(err)}): replace or remove the file") from None
    finally:
        if hasattr(image, "seek"):
            image.seek(0)


def channels_of(train, where, test=()) -> int:
    """The channel count `data.channels = 0` gives a category from its image files (paths
    or binary file objects): 1 when every training image is grey, else 3. The rule for a
    mix: training images that mix grey and colour are all read as RGB (grey values copied
    to R, G and B, which loses nothing); colour test images of a grey category are read
    as grey. Either case warns once, naming `where`."""
    grey = [_grey_file(image) for image in train]
    if all(grey):
        colour_tests = sum(not _grey_file(image) for image in test)
        if colour_tests:
            warn(f"{where}: the training images are grey but {colour_tests} test image(s) are colour: they are "
                 f"read as grey; set data.channels=3 to keep colour")
        return 1
    if any(grey):
        warn(f"{where} mixes grey and colour training images ({sum(grey)} grey, {len(grey) - sum(grey)} colour): "
             f"all images are read as RGB; set data.channels=1 or 3 to choose")
    return 3


def _read(path: pathlib.Path, image_size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image resized (bilinear) to uint8 [S, S, C] in [0, 255], and its original (H, W)."""
    image = _open(path)
    size = (image.height, image.width)
    image = _to_8bit(image, channels).resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, np.uint8)
    return array.reshape(image_size, image_size, channels), size


def _read_mask(path: pathlib.Path) -> np.ndarray:
    """A ground-truth mask binarised (> 0) at its own size: uint8 [H, W] in {0, 1}."""
    image = _open(path)
    if image.mode in ("P", "PA"):
        image = image.convert("L")
    values = np.asarray(image)
    if values.ndim == 3:  # colour or with alpha: any non-black colour channel is foreground
        values = values[..., 0] if image.mode == "LA" else values[..., :3].max(axis=-1)
    return (values > 0).astype(np.uint8)


def _mask_path(gt_dir: pathlib.Path, defect: str, stem: str) -> pathlib.Path | None:
    folder = gt_dir / defect
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _train_dir(folder: pathlib.Path) -> pathlib.Path | None:
    """folder/train/good, or folder/train/ok; None if neither exists."""
    return next((folder / "train" / n for n in NORMAL_FOLDERS if (folder / "train" / n).is_dir()), None)


def list_categories(root) -> list[str]:
    """Sorted names of the sub-folders of `root` that have train/good (or train/ok)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass the folder that holds the category folders")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _train_dir(p) is not None)


def _read_all(paths, image_size: int, channels: int):
    images = np.zeros((len(paths), image_size, image_size, channels), np.uint8)
    sizes = np.zeros((len(paths), 2), np.int32)
    for i, path in enumerate(paths):
        images[i], sizes[i] = _read(path, image_size, channels)
    return images, sizes


def folder_items(root, category: str, image_level: bool = False):
    """(train_items, test_items) of `category` under `root` in MVTec layout: items
    (name, defect, image path, mask path or None), train sorted by file name, test by
    (defect folder, file name); names "train/<good|ok>/<stem>", "test/<defect>/<stem>",
    defect "good" for the normal folders. DataError naming what is missing otherwise.
    image_level: a category whose defect images have no mask at all (a one-class set:
    test/<other class>/ without ground_truth/) is read with mask None for every image,
    with a warning; a mask missing beside others is still an error."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass the folder that holds the category folders")
    folder = pathlib.Path(inside(root, plain_name(category, "--category"), "--category"))
    if not folder.is_dir():
        known = ", ".join(list_categories(root)) or "none"
        raise DataError(f"category folder {folder} not found (categories with train/good: {known}): "
                        f"check the category name")
    train_dir = _train_dir(folder)
    if train_dir is None:
        raise DataError(f"training folder {folder / 'train' / 'good'} not found: put the normal training images "
                        f"there (train/ok is accepted too)")
    train_paths = _image_files(train_dir)
    if not train_paths:
        raise DataError(f"training folder {train_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                        f"put the normal training images there")
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise DataError(f"test folder {test_dir} not found: put test images in test/good and test/<defect>")
    test_paths = []
    for defect_dir in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        test_paths += _image_files(defect_dir)
    if not test_paths:
        raise DataError(f"test folder {test_dir} has no images: put test images in test/good and test/<defect>")
    gt_dir = folder / "ground_truth"
    test_items = []
    for path in test_paths:
        defect = "good" if path.parent.name in NORMAL_FOLDERS else path.parent.name
        mask = None if defect == "good" else _mask_path(gt_dir, defect, path.stem)
        test_items.append((f"test/{path.parent.name}/{path.stem}", defect, path, mask))
    missing = [(path, defect) for _, defect, path, mask in test_items if defect != "good" and mask is None]
    defects = sum(defect != "good" for _, defect, _, _ in test_items)
    if missing and not (image_level and len(missing) == defects):
        path, defect = missing[0]
        raise DataError(f"no mask for defect image {path}: add {gt_dir / defect / (path.stem + '_mask.png')} "
                        f"(0 = normal, 255 = defect; {path.stem}.png is also accepted)")
    if missing:
        warn(f"category folder {folder}: none of its {defects} anomalous test images has a mask in {gt_dir}: "
             f"image-level metrics only (the pixel metrics are nan)")
    train_items = [(f"train/{train_dir.name}/{p.stem}", "good", p, None) for p in train_paths]
    return train_items, test_items


def small_mask(full: np.ndarray, image_size: int) -> np.ndarray:
    """A binary mask uint8 [H, W] resized (nearest) to uint8 [S, S] in {0, 1}."""
    small = Image.fromarray(full).resize((image_size, image_size), Image.NEAREST)
    return (np.asarray(small) > 0).astype(np.uint8)


def read_items(items, image_size: int, channels: int, train: bool) -> Split:
    """A split from `items` (name, defect, image, mask), where image is a path or a binary
    file object holding an encoded image, and mask None (normal: an all-zero mask) or a
    path / file object holding a mask (binarised > 0). channels: 1 or 3. train=True gives a
    normal-only split without masks; otherwise images uint8 [N, S, S, C], masks uint8
    [N, S, S] (nearest resize), labels (defect != "good"), full_masks at original size."""
    n = len(items)
    images = np.zeros((n, image_size, image_size, channels), np.uint8)
    sizes = np.zeros((n, 2), np.int32)
    for i, (_, _, image, _) in enumerate(items):
        images[i], sizes[i] = _read(image, image_size, channels)
    names = tuple(name for name, _, _, _ in items)
    if train:
        return normal_split(images, names, sizes)
    masks = np.zeros((n, image_size, image_size), np.uint8)
    full_masks = []
    for i, (_, _, image, mask) in enumerate(items):
        if mask is None:
            full_masks.append(np.zeros(tuple(sizes[i]), np.uint8))
            continue
        full = _read_mask(mask)
        if full.shape != tuple(sizes[i]):
            raise DataError(f"mask {mask} is {full.shape[1]}x{full.shape[0]} (WxH) but image {image} is "
                            f"{sizes[i][1]}x{sizes[i][0]}: masks must match their image size")
        masks[i] = small_mask(full, image_size)
        full_masks.append(full)
    defects = tuple(defect for _, defect, _, _ in items)
    return Split(images=images, masks=masks, labels=np.array([d != "good" for d in defects], np.int32).reshape(n),
                 names=names, defect_types=defects, original_sizes=sizes, full_masks=full_masks)


def load_folder(root, category: str, image_size: int, channels: int = 0, image_level: bool = False) -> Dataset:
    """Category `category` of the MVTec-AD style dataset under `root`.

    channels: 0 keeps grey data grey: 1 when every training image is grey,
    else 3 (`channels_of` states the rule for a mix, which warns); 1 or 3
    converts every image to grey or RGB. Images are uint8
    [N, S, S, C] in [0, 255] (bilinear resize), masks uint8 [N, S, S] in
    {0, 1} (nearest resize of the binarised mask); test.full_masks holds the
    binarised masks at original size and original_sizes the source (H, W).
    The test split is sorted by (defect, file name), named "test/<defect>/<stem>".
    `category` must be a plain folder name inside `root` (no '..', no '/', no link
    leading outside). image_level: as `folder_items` (anomalous test images then have
    all-zero masks).
    """
    _check_channels(channels)
    _check_size(image_size)
    train_items, test_items = folder_items(root, category, image_level)
    if channels == 0:
        channels = channels_of([item[2] for item in train_items], f"category folder {root}/{category}",
                               [item[2] for item in test_items])
    return Dataset(name="folder", category=category, train=read_items(train_items, image_size, channels, True),
                   test=read_items(test_items, image_size, channels, False))


def image_paths(paths_or_dir) -> list[pathlib.Path]:
    """The image files named by `paths_or_dir`: an image file, a folder (its image files,
    sorted by name, not recursive), or a list of those."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, pathlib.Path)) else list(paths_or_dir)
    paths = []
    for item in items:
        item = pathlib.Path(item)
        if item.is_dir():
            found = _image_files(item)
            if not found:
                raise DataError(f"folder {item} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                                f"pass a folder of images or image files")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"image path {item} does not exist: pass an image file or a folder of images")
    if not paths:
        raise DataError("no images given: pass an image file or a folder of images")
    return paths


def read_full_size(path, channels: int) -> np.ndarray:
    """One image at its own size as uint8 [H, W, channels] (channels 1 or 3)."""
    _check_channels(channels)
    array = np.asarray(_to_8bit(_open(pathlib.Path(path)), channels), np.uint8)
    return array.reshape(array.shape[:2] + (channels,))


def load_images(paths_or_dir, image_size: int, channels: int = 0):
    """Arbitrary images for prediction.

    paths_or_dir: as for `image_paths`. channels: 0 decides grey/RGB from the
    first image; 1 or 3 converts. Returns (images uint8 [N, S, S, C] in
    [0, 255], names (file stems), original_sizes int32 [N, 2] (H, W)).
    """
    _check_channels(channels)
    _check_size(image_size)
    paths = image_paths(paths_or_dir)
    if channels == 0:
        channels = channels_of(paths, "the input images")
    images, sizes = _read_all(paths, image_size, channels)
    return images, tuple(p.stem for p in paths), sizes
