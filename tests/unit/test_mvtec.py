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

from fmjax.data import mvtec
from fmjax.data import tfds as fmjax_tfds
from fmjax.data.tfds import builders as tfds_builders
from fmjax.data.base import DataError

W, H = 40, 30  # source images are 40 wide, 30 high
S = 16


def _rgb(seed, w=W, h=H):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _grey(seed, w=W, h=H):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path


def _mask(top, left, h=8, w=10, value=255):
    m = np.zeros((H, W), np.uint8)
    m[top:top + h, left:left + w] = value
    return m


def _bilinear(array, mode=None):
    return np.asarray(Image.fromarray(array, mode).resize((S, S), Image.BILINEAR))


@pytest.fixture
def root(tmp_path):
    """MVTec-AD layout: "bottle" (RGB, plus a palette PNG and a JPEG) and "grid" (grey, plus a 16-bit PNG)."""
    root = tmp_path / "mvtec"
    bottle = root / "bottle"
    for i in range(3):
        _save(bottle / "train/good" / f"{i:03d}.png", _rgb(i))
    _save(bottle / "train/good/003.png", Image.fromarray(_rgb(4)).quantize(16))  # palette ("P") image
    _save(bottle / "test/good/000.png", _rgb(10))
    _save(bottle / "test/good/001.jpg", _rgb(11))
    _save(bottle / "test/broken_large/000.png", _rgb(12))
    _save(bottle / "test/broken_large/001.png", _rgb(13))
    _save(bottle / "ground_truth/broken_large/000_mask.png", _mask(3, 5))
    _save(bottle / "ground_truth/broken_large/001_mask.png", _mask(20, 25))

    grid = root / "grid"
    for i in range(2):
        _save(grid / "train/good" / f"{i:03d}.png", _grey(20 + i))
    _save(grid / "train/good/002.png", Image.fromarray(_grey(22).astype(np.uint16) * 257))
    _save(grid / "test/good/000.png", _grey(30))
    _save(grid / "test/bent/000.png", _grey(31))
    _save(grid / "ground_truth/bent/000_mask.png", _mask(10, 10))
    return root


def test_categories():
    assert len(mvtec.CATEGORIES) == 15 and len(set(mvtec.CATEGORIES)) == 15
    assert set(mvtec.GREY_CATEGORIES) == {"grid", "screw", "zipper"} <= set(mvtec.CATEGORIES)


def test_rgb_category(root):
    ds = mvtec.load_mvtec(root, "bottle", S)
    assert (ds.name, ds.category) == ("mvtec", "bottle")
    assert ds.train.images.shape == (4, S, S, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.names == ("train/good/000", "train/good/001", "train/good/002", "train/good/003")
    assert ds.test.names == ("test/broken_large/000", "test/broken_large/001", "test/good/000", "test/good/001")
    assert ds.test.defect_types == ("broken_large", "broken_large", "good", "good")
    assert ds.test.labels.tolist() == [1, 1, 0, 0]
    assert (ds.test.images[0] == _bilinear(_rgb(12))).all()
    assert (ds.train.images[1] == _bilinear(_rgb(1))).all()
    full = ds.test.full_masks[1]
    assert full.shape == (H, W) and set(np.unique(full)) == {0, 1} and full.sum() == 80
    expected = np.asarray(Image.fromarray(_mask(20, 25)).resize((S, S), Image.NEAREST)) > 0
    assert (ds.test.masks[1] == expected).all() and ds.test.masks[2:].sum() == 0


def test_grey_category_is_three_channels_by_default(root):
    ds = mvtec.load_mvtec(root, "grid", S)
    assert ds.train.images.shape == (3, S, S, 3) and ds.test.images.shape == (2, S, S, 3)
    expected = _bilinear(_grey(20))
    for c in range(3):
        assert (ds.train.images[0, ..., c] == expected).all()
    # 16-bit grey is scaled to 8 bits before resizing
    assert (ds.train.images[2, ..., 0] == _bilinear(_grey(22))).all()
    grey = mvtec.load_mvtec(root, "grid", S, channels=1)
    assert grey.train.images.shape == (3, S, S, 1) and (grey.train.images[0, ..., 0] == expected).all()
    assert mvtec.load_mvtec(root, "grid", S, channels=0).train.images.shape[-1] == 1
    # an RGB category asked for grey: PIL's RGB -> L conversion
    rgb_as_grey = mvtec.load_mvtec(root, "bottle", S, channels=1)
    assert (rgb_as_grey.train.images[0, ..., 0] == _bilinear(np.asarray(Image.fromarray(_rgb(0)).convert("L")))).all()


def test_unknown_category(root):
    with pytest.raises(DataError) as err:
        mvtec.load_mvtec(root, "bottel", S)
    message = str(err.value)
    assert "\n" not in message and "'bottel'" in message and "bottle, cable, capsule" in message
    assert str(root / "bottel") in message
    # a category outside the list is read when its folder exists
    shutil.copytree(root / "bottle", root / "my_part")
    ds = mvtec.load_mvtec(root, "my_part", S)
    assert ds.category == "my_part" and len(ds.train) == 4


def test_missing_mask_names_the_file(root):
    (root / "bottle/ground_truth/broken_large/001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        mvtec.load_mvtec(root, "bottle", S)
    message = str(err.value)
    assert "\n" not in message and str(root / "bottle/test/broken_large/001.png") in message
    assert "001_mask.png" in message


def test_mask_size_mismatch(root):
    _save(root / "bottle/ground_truth/broken_large/000_mask.png", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(DataError, match="must match their image size"):
        mvtec.load_mvtec(root, "bottle", S)


# ----------------------------------------------------------------------------- TFDS

def test_builder_class_is_configured():
    builder_cls = tfds_builders.MVTecAD
    assert builder_cls.name == "mvtec_ad"
    assert [c.name for c in builder_cls.BUILDER_CONFIGS] == list(mvtec.CATEGORIES)
    assert "manual_dir/<category>/train/good" in builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS


@pytest.mark.parametrize("category,channels", [("bottle", 3), ("bottle", 1), ("grid", 3), ("grid", 0)])
def test_tfds_matches_folder(root, tmp_path, category, channels):
    ds = fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", root, category, S, channels)
    assert_same(ds, mvtec.load_mvtec(root, category, S, channels))
    if channels == 0:
        assert ds.train.images.shape[-1] == 1  # grey stays grey, as in the folder reader


def test_tfds_reuses_the_build_and_stores_the_features(root, tmp_path):
    data_dir = tmp_path / "tfds"
    first = fmjax_tfds.load_mvtec_tfds(data_dir, root, "bottle", S)
    files = sorted(p.name for p in (data_dir / "mvtec_ad/bottle/1.0.0").iterdir())
    assert "mvtec_ad-test.array_record-00000-of-00001" in files and "dataset_info.json" in files
    moved = tmp_path / "moved"
    root.rename(moved)  # the archive is gone: the second read uses the build only
    assert_same(fmjax_tfds.load_mvtec_tfds(data_dir, None, "bottle", S), first)
    with pytest.raises(DataError, match="pass manual_dir"):
        fmjax_tfds.load_mvtec_tfds(data_dir, None, "grid", S)

    # the records decode with TFDS's own numpy decoders too: image [H, W, 3], mask [H, W, 1] 0 / 255
    builder = tfds_builders.builder(tfds_builders.MVTecAD, data_dir, "bottle")
    example = builder.as_data_source("test")[1]
    assert example["name"] == b"test/broken_large/001" and example["defect_type"] == b"broken_large"
    assert example["label"] == 1
    assert (example["image"] == _rgb(13)).all()
    assert (example["mask"][..., 0] == _mask(20, 25)).all()


def test_tfds_grey_images_decode_to_three_channels(root, tmp_path):
    fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", root, "grid", S)
    source = tfds_builders.builder(tfds_builders.MVTecAD, tmp_path / "tfds", "grid").as_data_source("train")
    image = source[2]["image"]  # stored from a 16-bit PNG as 8-bit grey
    assert image.shape == (H, W, 3) and (image == (_grey(22))[..., None]).all()


def test_tfds_errors(root, tmp_path):
    with pytest.raises(DataError) as err:
        fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", tmp_path / "empty", "bottle", S)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "empty/bottle/train/good") in message
    with pytest.raises(DataError, match="unknown MVTec-AD category 'bottel'"):
        fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", root, "bottel", S)
    (root / "bottle/ground_truth/broken_large/000_mask.png").unlink()
    with pytest.raises(DataError, match="no mask for defect image"):
        fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", root, "bottle", S)
    assert not (tmp_path / "tfds/mvtec_ad/bottle/1.0.0").exists()  # a failed build leaves nothing to reuse


def test_tfds_custom_category(root, tmp_path):
    shutil.copytree(root / "bottle", root / "my_part")
    ds = fmjax_tfds.load_mvtec_tfds(tmp_path / "tfds", root, "my_part", S)
    assert_same(ds, mvtec.load_mvtec(root, "my_part", S))


_NO_TF_SCRIPT = TENSORFLOW_IMPORT_RECORDER + r"""
from fmjax.data import tfds as fmjax_tfds

data_dir, manual_dir = sys.argv[1:3]
built = fmjax_tfds.load_mvtec_tfds(data_dir, manual_dir, "bottle", 16)
again = fmjax_tfds.load_mvtec_tfds(data_dir, None, "bottle", 16)  # read-only path
print(json.dumps({"attempts": attempts, "loaded": "tensorflow" in sys.modules, "n_test": len(again.test),
                  "tfds": "tensorflow_datasets" in sys.modules}))
"""


def test_tfds_does_not_import_tensorflow(root, tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "tfds"), str(root)],
                            capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"attempts": [], "loaded": False, "n_test": 4, "tfds": True}
