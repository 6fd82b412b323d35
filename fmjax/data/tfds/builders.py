"""TensorFlow Datasets builders for MVTec-AD and VisA, usable without TensorFlow.

Both datasets are manual downloads: the extracted archive is passed as
`manual_dir`, and `download_and_prepare(file_format="array_record")` writes
ArrayRecord files that `builder.as_data_source(split)` reads with numpy only.
One builder config per category; splits "train" (normal images) and "test".

Features of every example:
  image        tfds.features.Image (None, None, 3): encoded bytes. RGB PNG/JPEG
               and 8-bit grey PNG/JPEG files are stored as they are (grey images
               decode to 3 equal channels); any other file is stored as an
               8-bit PNG converted exactly as folder.py converts it.
  mask         tfds.features.Image (None, None, 1): PNG, 0 / 255, the binarised
               (> 0) mask at the image's size; all zero for normal images.
  label        ClassLabel: normal / anomalous.
  defect_type  Text: "good" for normal images, else the defect folder name.
  name         Text: "train/good/<id>" or "test/<defect>/<id>".

Images are handed to TFDS as encoded bytes, never as numpy arrays (encoding an
array would import TensorFlow). `load` reads the records back without letting
TFDS decode them and decodes them with folder.py's functions, so its arrays are
identical to the folder readers'. Examples keep their order (shuffling is
disabled): test sorted by (defect, file name) as in folder.load_folder.
"""
from __future__ import annotations

import inspect
import io
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fmjax.data import folder, mvtec, visa
from fmjax.data.base import DataError, Dataset
from fmjax.files import plain_name

FILE_FORMAT = "array_record"
_PASS_THROUGH = {"PNG": ("RGB", "L"), "JPEG": ("RGB", "L")}  # PIL format -> modes stored as they are


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(path: pathlib.Path) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes to store, (H, W)) for the image file at `path`.

    The stored image decodes (with folder.py) to exactly what the file decodes
    to after folder._to_8bit, for channels 1 and 3, and is grey iff the file is.
    """
    image = folder._open(path)
    size = (image.height, image.width)
    if image.mode in _PASS_THROUGH.get(image.format, ()):
        return pathlib.Path(path).read_bytes(), size
    channels = 1 if folder._is_grey(image) else 3
    return _png(folder._to_8bit(image, channels)), size


class _Record(io.BytesIO):
    """Encoded bytes read back from a TFDS record; str() names the record (for error messages)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self):
        return self.where


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared parts of the MVTec-AD and VisA builders (one config per category, manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CATEGORIES: tuple = ()
    TITLE = ""  # the dataset's name in messages
    _DESCRIPTION = ""
    _HOMEPAGE = ""
    _CITATION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> tfds.core.Path:
        # The file defining the class (TFDS's own fallback). TFDS 4.9.10 first asks
        # importlib_resources, which it installs on Python < 3.9 only (tensorflow/datasets
        # issue 11212), so its default fails for builders defined inside a package.
        return tfds.core.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["normal", "anomalous"]),
                "defect_type": tfds.features.Text(),
                "name": tfds.features.Text(),
            }),
            homepage=self._HOMEPAGE,
            citation=self._CITATION,
            disable_shuffling=True,
        )

    @classmethod
    def check_manual_dir(cls, manual_dir, category: str) -> None:
        """DataError unless manual_dir holds `category` in a layout this builder reads."""
        raise NotImplementedError

    @classmethod
    def items(cls, manual_dir, category: str):
        """(train_items, test_items) of (name, defect, image path, mask path or None)."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        root = pathlib.Path(os.fspath(dl_manager.manual_dir))
        train_items, test_items = self.items(root, self.builder_config.name)
        return {"train": self._generate_examples(train_items), "test": self._generate_examples(test_items)}

    def _generate_examples(self, items):
        for index, (name, defect, image_path, mask_path) in enumerate(items):
            image, size = encode_image(image_path)
            if mask_path is None:
                full = np.zeros(size, np.uint8)
            else:
                full = folder._read_mask(mask_path)
                if full.shape != size:
                    raise DataError(f"mask {mask_path} is {full.shape[1]}x{full.shape[0]} (WxH) but image "
                                    f"{image_path} is {size[1]}x{size[0]}: masks must match their image size")
            yield index, {  # integer keys: with shuffling disabled, records keep this order
                "image": image,
                "mask": _png(Image.fromarray(full * np.uint8(255))),
                "label": int(defect != "good"),
                "defect_type": defect,
                "name": name,
            }


class MVTecAD(_AnomalyBuilder, skip_registration=True):
    """MVTec-AD, one config per category, from the extracted archive (manual download)."""

    name = "mvtec_ad"
    TITLE = "MVTec-AD"
    CATEGORIES = mvtec.CATEGORIES
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"MVTec-AD category {c}") for c in CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_anomaly_detection.tar.xz from https://www.mvtec.com/company/research/datasets/mvtec-ad "
        "(free for non-commercial use after registration) and extract it into manual_dir so that "
        "manual_dir/<category>/train/good exists (e.g. manual_dir/bottle/train/good/000.png)."
    )
    _DESCRIPTION = ("MVTec-AD: 15 categories of industrial objects and textures; normal training images and "
                    "test images with pixel-precise defect masks.")
    _HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    _CITATION = """@inproceedings{mvtec_ad,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  booktitle={CVPR}, year={2019}}"""

    @classmethod
    def check_manual_dir(cls, manual_dir, category: str) -> None:
        train_dir = pathlib.Path(manual_dir) / category / "train" / "good"
        if not train_dir.is_dir():
            raise DataError(f"training folder {train_dir} not found: extract the MVTec-AD archive into "
                            f"{manual_dir} so that {train_dir} exists")

    @classmethod
    def items(cls, manual_dir, category: str):
        return folder.folder_items(manual_dir, category)


class VisA(_AnomalyBuilder, skip_registration=True):
    """VisA, one config per category, from the raw archive or the converted layout (manual download)."""

    name = "visa"
    TITLE = "VisA"
    CATEGORIES = visa.CATEGORIES
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"VisA category {c}") for c in CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download VisA_20220922.tar from https://github.com/amazon-science/spot-diff and extract it into "
        "manual_dir so that manual_dir/split_csv/1cls.csv and manual_dir/<category>/Data/Images exist, or "
        "pass a converted (MVTec-like) copy with manual_dir/<category>/train/good."
    )
    _DESCRIPTION = ("VisA: 12 categories of objects (PCBs, macaroni, capsules, ...); normal training images and "
                    "test images with pixel-level defect masks, one-class split 1cls.csv.")
    _HOMEPAGE = "https://github.com/amazon-science/spot-diff"
    _CITATION = """@inproceedings{visa,
  title={SPot-the-Difference Self-supervised Pre-training for Anomaly Detection and Segmentation},
  booktitle={ECCV}, year={2022}}"""

    @classmethod
    def check_manual_dir(cls, manual_dir, category: str) -> None:
        visa.layout(manual_dir, category)

    @classmethod
    def items(cls, manual_dir, category: str):
        if visa.layout(manual_dir, category) == "folder":
            return folder.folder_items(manual_dir, category)
        return visa.raw_items(manual_dir, category)


def builder(builder_cls, data_dir, category: str, manual_dir=None) -> tfds.core.DatasetBuilder:
    """The builder of `category` writing ArrayRecord files under data_dir.

    Categories outside builder_cls.CATEGORIES get a custom config if their data
    exists (manual_dir/<category> or an earlier build); else DataError.
    """
    plain_name(category, "category")
    data_dir = pathlib.Path(data_dir)
    config = category
    if category not in builder_cls.CATEGORIES:
        built = data_dir / builder_cls.name / category
        if not (built.is_dir() or (manual_dir is not None and (pathlib.Path(manual_dir) / category).is_dir())):
            mvtec.check_category(category, builder_cls.CATEGORIES, manual_dir, builder_cls.TITLE)
        config = tfds.core.BuilderConfig(name=category, version=builder_cls.VERSION)
    return builder_cls(config=config, data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)


def prepare(builder_cls, data_dir, manual_dir, category: str) -> tfds.core.DatasetBuilder:
    """The builder of `category`, built from manual_dir first if it is not built yet.

    An existing build is reused as it is, whatever manual_dir holds now: delete
    data_dir/<builder name>/<category> to rebuild.
    """
    b = builder(builder_cls, data_dir, category, manual_dir)
    # (checking the file first spares TFDS's warning about a missing folder)
    if (b.data_path / "dataset_info.json").exists() and b.is_prepared():
        return b
    if manual_dir is None:
        raise DataError(f"{builder_cls.name}/{category} is not built under {data_dir}: pass manual_dir "
                        f"(the extracted archive) to build it")
    builder_cls.check_manual_dir(manual_dir, category)
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    b.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
    return b


def _source(b: tfds.core.DatasetBuilder, split: str):
    skip = tfds.decode.SkipDecoding()
    try:
        return b.as_data_source(split, decoders={"image": skip, "mask": skip}, file_format=FILE_FORMAT)
    except (NotImplementedError, ValueError) as err:
        raise DataError(f"cannot read {b.data_path} as {FILE_FORMAT} ({folder._one_line(err)}): delete that "
                        f"folder to rebuild it, or use another data_dir") from None


def records(b: tfds.core.DatasetBuilder, split: str):
    """Items (name, defect, image file object, mask file object or None) of `split`, in stored order.

    The file objects hold the stored encoded bytes (TFDS does not decode them).
    """
    source = _source(b, split)
    out = []
    for i in range(len(source)):
        example = source[i]
        name = example["name"].decode("utf-8")
        defect = example["defect_type"].decode("utf-8")
        where = f"{b.data_path} {split} record {i} ({name})"
        mask = None if defect == "good" else _Record(example["mask"], f"mask of {where}")
        out.append((name, defect, _Record(example["image"], where), mask))
    return out


def load(builder_cls, data_dir, manual_dir, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` built (if needed) and read through TFDS, decoded exactly like folder.load_folder.

    Returns Dataset(name=builder_cls.name): images uint8 [N, S, S, C], test
    masks uint8 [N, S, S] in {0, 1}, full_masks at original size. channels 0:
    grey when every training image is, else RGB, as folder.load_folder does.
    """
    folder._check_channels(channels)
    folder._check_size(image_size)
    b = prepare(builder_cls, data_dir, manual_dir, category)
    train_items, test_items = records(b, "train"), records(b, "test")
    if not train_items or not test_items:
        raise DataError(f"{b.data_path} has an empty split: delete that folder and rebuild it from manual_dir")
    if channels == 0:
        channels = folder.channels_of([item[2] for item in train_items], b.data_path,
                                      [item[2] for item in test_items])
    train = folder.read_items(train_items, image_size, channels, train=True)
    test = folder.read_items(test_items, image_size, channels, train=False)
    return Dataset(name=builder_cls.name, category=category, train=train, test=test)
