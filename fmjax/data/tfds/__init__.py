"""MVTec-AD and VisA through TensorFlow Datasets builders (ArrayRecord files read
without TensorFlow), with arrays identical to the folder readers'. Needs the optional
extra `pip install fmjax[tfds]`; `--data tfds:mvtec_ad` or `--data tfds:visa` reads a
build prepared under $TFDS_DATA_DIR (default ~/tensorflow_datasets)."""
from __future__ import annotations

import dataclasses
import os

from fmjax.data.base import DataError, Dataset

__all__ = ["BUILDERS", "data_dir", "load_mvtec_tfds", "load_prepared", "load_visa_tfds"]

BUILDERS = {"mvtec_ad": "MVTecAD", "visa": "VisA"}  # builder name -> class in builders.py


def _builders():
    try:
        from fmjax.data.tfds import builders
    except ImportError as err:
        raise DataError(f"reading TFDS data needs tensorflow-datasets and array_record ({err}): "
                        f"pip install fmjax[tfds]") from None
    return builders


def data_dir() -> str:
    """Where TFDS builds live: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def load_mvtec_tfds(data_dir, manual_dir, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of MVTec-AD through the TFDS builder `MVTecAD`, without TensorFlow.

    Builds data_dir/mvtec_ad/<category>/<version>/ (ArrayRecord files) from the
    extracted archive in manual_dir (manual_dir/<category>/train/good ...) if it
    is not built yet (manual_dir may be None once it is), then reads it with
    `builder.as_data_source`. The arrays, names and masks are identical to
    `fmjax.data.mvtec.load_mvtec(manual_dir, category, image_size, channels)`.
    """
    builders = _builders()
    ds = builders.load(builders.MVTecAD, data_dir, manual_dir, category, image_size, channels)
    return dataclasses.replace(ds, name="mvtec")


def load_visa_tfds(data_dir, manual_dir, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of VisA through the TFDS builder `VisA`, without TensorFlow
    (from either VisA layout in manual_dir); arrays identical to
    `fmjax.data.visa.load_visa(manual_dir, category, image_size, channels)`."""
    builders = _builders()
    ds = builders.load(builders.VisA, data_dir, manual_dir, category, image_size, channels)
    return dataclasses.replace(ds, name="visa")


def load_prepared(builder_name: str, category: str, image_size: int, channels: int = 3) -> Dataset:
    """Category `category` of a build prepared under `data_dir()` (`--data tfds:NAME`)."""
    if builder_name not in BUILDERS:
        raise DataError(f"unknown TFDS dataset {builder_name!r} (known: {', '.join(BUILDERS)})")
    builders = _builders()
    return builders.load(getattr(builders, BUILDERS[builder_name]), data_dir(), None, category, image_size,
                         channels)
