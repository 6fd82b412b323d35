import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT as REPO
from helpers import TENSORFLOW_IMPORT_RECORDER, assert_same
from PIL import Image

from fmjax.data import visa
from fmjax.data import tfds as fmjax_tfds
from fmjax.data.tfds import builders as tfds_builders
from fmjax.data.base import DataError

W, H = 36, 28
S = 16
HEADER = "object,split,label,image,mask\n"


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _class_mask(top, left):
    """A VisA mask: class ids 0 (background), 1 and 2 (two defect regions)."""
    m = np.zeros((H, W), np.uint8)
    m[top:top + 5, left:left + 6] = 1
    m[top + 8:top + 10, left:left + 3] = 2
    return m


def _decoded(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _bilinear(array):
    return np.asarray(Image.fromarray(array).resize((S, S), Image.BILINEAR))


@pytest.fixture
def raw(tmp_path):
    """The raw archive layout: candle (3 train, 1 normal + 2 anomalous test) and a pcb1 row."""
    root = tmp_path / "VisA"
    images, masks = root / "candle/Data/Images", root / "candle/Data/Masks/Anomaly"
    rows = []
    for i in range(4):
        _save(images / f"Normal/{i:04d}.JPG", _rgb(i))
        rows.append(f"candle,{'train' if i < 3 else 'test'},normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    for i in (1, 0):  # csv order differs from the sorted order
        _save(images / f"Anomaly/{i:03d}.JPG", _rgb(10 + i))
        _save(masks / f"{i:03d}.png", _class_mask(2 + 10 * i, 3 + 10 * i))
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,candle/Data/Masks/Anomaly/{i:03d}.png")
    _save(root / "pcb1/Data/Images/Normal/0000.JPG", _rgb(99))
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def converted(raw, tmp_path):
    """The same candle data in the converted (MVTec-like) layout."""
    root = tmp_path / "visa_pytorch"
    src = raw / "candle/Data"
    for i in range(3):
        _copy(src / f"Images/Normal/{i:04d}.JPG", root / f"candle/train/good/{i:04d}.JPG")
    _copy(src / "Images/Normal/0003.JPG", root / "candle/test/good/0003.JPG")
    for i in range(2):
        _copy(src / f"Images/Anomaly/{i:03d}.JPG", root / f"candle/test/bad/{i:03d}.JPG")
        _copy(src / f"Masks/Anomaly/{i:03d}.png", root / f"candle/ground_truth/bad/{i:03d}.png")
    return root


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _error(fn, *args, **kw):
    with pytest.raises(DataError) as err:
        fn(*args, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_categories():
    assert len(visa.CATEGORIES) == 12 and len(set(visa.CATEGORIES)) == 12
    assert {"candle", "pcb4", "pipe_fryum", "macaroni2"} <= set(visa.CATEGORIES)


def test_raw_layout(raw):
    assert visa.layout(raw, "candle") == "raw"
    ds = visa.load_visa(raw, "candle", S)
    assert (ds.name, ds.category) == ("visa", "candle")
    assert ds.train.names == ("train/good/0000", "train/good/0001", "train/good/0002")
    assert ds.test.names == ("test/bad/000", "test/bad/001", "test/good/0003")
    assert ds.test.defect_types == ("bad", "bad", "good")
    assert ds.test.labels.tolist() == [1, 1, 0] and ds.test.labels.dtype == np.int32
    assert ds.train.images.shape == (3, S, S, 3) and ds.test.images.dtype == np.uint8
    assert (ds.test.original_sizes == [H, W]).all()
    raw_dir = raw / "candle/Data/Images"
    assert (ds.train.images[2] == _bilinear(_decoded(raw_dir / "Normal/0002.JPG"))).all()
    assert (ds.test.images[1] == _bilinear(_decoded(raw_dir / "Anomaly/001.JPG"))).all()
    # class ids 1 and 2 are both defect: binarised, full size kept, nearest resize
    for i in range(2):
        expected = (_class_mask(2 + 10 * i, 3 + 10 * i) > 0).astype(np.uint8)
        assert ds.test.full_masks[i].dtype == np.uint8 and (ds.test.full_masks[i] == expected).all()
        small = np.asarray(Image.fromarray(expected).resize((S, S), Image.NEAREST))
        assert (ds.test.masks[i] == small).all() and set(np.unique(ds.test.masks[i])) == {0, 1}
    assert ds.test.full_masks[2].shape == (H, W) and ds.test.full_masks[2].sum() == 0 and ds.test.masks[2].sum() == 0


def test_converted_layout_equals_raw(raw, converted):
    assert visa.layout(converted, "candle") == "folder"
    assert_same(visa.load_visa(converted, "candle", S), visa.load_visa(raw, "candle", S))


def test_channels(raw, converted):
    grey = visa.load_visa(raw, "candle", S, channels=1)
    assert grey.train.images.shape == (3, S, S, 1)
    expected = np.asarray(Image.open(raw / "candle/Data/Images/Normal/0000.JPG").convert("L")
                          .resize((S, S), Image.BILINEAR))
    assert (grey.train.images[0, ..., 0] == expected).all()
    assert visa.load_visa(raw, "candle", S, channels=0).train.images.shape[-1] == 3
    assert_same(visa.load_visa(converted, "candle", S, channels=1), grey)


def test_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _error(visa.load_visa, tmp_path / "empty", "candle", S)
    assert str(tmp_path / "empty/candle/train/good") in message and "split_csv/1cls.csv" in message
    message = _error(visa.load_visa, tmp_path / "empty", "candel", S)
    assert "unknown VisA category 'candel'" in message and "candle, capsules" in message
    assert "is not a folder" in _error(visa.load_visa, tmp_path / "nothing", "candle", S)


def test_raw_category_not_in_csv(raw):
    message = _error(visa.load_visa, raw, "cashew", S)
    assert str(raw / "split_csv/1cls.csv") in message and "objects: candle, pcb1" in message


def test_raw_missing_files(raw):
    (raw / "candle/Data/Masks/Anomaly/001.png").unlink()
    message = _error(visa.load_visa, raw, "candle", S)
    assert "1cls.csv line 6" in message and str(raw / "candle/Data/Masks/Anomaly/001.png") in message
    (raw / "candle/Data/Images/Normal/0001.JPG").unlink()
    message = _error(visa.load_visa, raw, "candle", S)
    assert "1cls.csv line 3" in message and str(raw / "candle/Data/Images/Normal/0001.JPG") in message


def test_raw_mask_size_mismatch(raw):
    _save(raw / "candle/Data/Masks/Anomaly/000.png", np.zeros((H + 1, W), np.uint8))
    message = _error(visa.load_visa, raw, "candle", S)
    assert str(raw / "candle/Data/Masks/Anomaly/000.png") in message and "must match their image size" in message


def test_raw_bad_csv(raw):
    csv_path = raw / "split_csv/1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("object,split,label,image,mask", "object,split,label,image"))
    message = _error(visa.load_visa, raw, "candle", S)
    assert str(csv_path) in message and "lacks column(s) mask" in message
    csv_path.write_text(text.replace("candle,train,normal,candle/Data/Images/Normal/0001.JPG",
                                     "candle,train,anomaly,candle/Data/Images/Normal/0001.JPG"))
    assert "line 3: anomalous image in the train split" in _error(visa.load_visa, raw, "candle", S)
    csv_path.write_text(text.replace("candle,test,normal", "candle,val,normal"))
    assert "split 'val' is not train or test" in _error(visa.load_visa, raw, "candle", S)


# ----------------------------------------------------------------------------- TFDS

def test_builder_class():
    builder_cls = tfds_builders.VisA
    assert builder_cls.name == "visa"
    assert [c.name for c in builder_cls.BUILDER_CONFIGS] == list(visa.CATEGORIES)
    assert "split_csv/1cls.csv" in builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS


@pytest.mark.parametrize("layout", ["raw", "converted"])
def test_tfds_matches_folder(raw, converted, tmp_path, layout):
    manual_dir = raw if layout == "raw" else converted
    ds = fmjax_tfds.load_visa_tfds(tmp_path / "tfds", manual_dir, "candle", S)
    assert_same(ds, visa.load_visa(manual_dir, "candle", S))
    assert_same(fmjax_tfds.load_visa_tfds(tmp_path / "tfds", None, "candle", S, channels=1),
                visa.load_visa(manual_dir, "candle", S, channels=1))
    # JPEG files are stored as they are, masks as 0 / 255 PNGs of the binarised class ids
    source = tfds_builders.builder(tfds_builders.VisA, tmp_path / "tfds", "candle").as_data_source("test")
    assert source[0]["name"] == b"test/bad/000" and source[0]["label"] == 1
    assert (source[0]["mask"][..., 0] == (_class_mask(2, 3) > 0) * 255).all()


def test_tfds_errors(raw, tmp_path):
    message = _error(fmjax_tfds.load_visa_tfds, tmp_path / "tfds", tmp_path / "nothing", "candle", S)
    assert str(tmp_path / "nothing") in message
    _save(raw / "candle/Data/Masks/Anomaly/000.png", np.zeros((H + 1, W), np.uint8))
    message = _error(fmjax_tfds.load_visa_tfds, tmp_path / "tfds", raw, "candle", S)
    assert "must match their image size" in message and str(raw / "candle/Data/Masks/Anomaly/000.png") in message


_NO_TF_SCRIPT = TENSORFLOW_IMPORT_RECORDER + r"""
from fmjax.data import tfds as fmjax_tfds

ds = fmjax_tfds.load_visa_tfds(sys.argv[1], sys.argv[2], "candle", 16)
print(json.dumps({"attempts": attempts, "loaded": "tensorflow" in sys.modules, "n_test": len(ds.test)}))
"""


def test_tfds_does_not_import_tensorflow(raw, tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "tfds"), str(raw)],
                            capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"attempts": [], "loaded": False, "n_test": 3}
