import dataclasses
import gzip
import pathlib

import numpy as np
import pytest
from PIL import Image

from fmjax.data import fashion_mnist as fm
from fmjax.data.base import DataError

TRAIN_LABELS = np.array([0, 3, 0, 9, 1, 0, 8, 3], np.uint8)
TEST_LABELS = np.array([9, 0, 2, 0, 7, 5], np.uint8)


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _idx(array: np.ndarray) -> bytes:
    if array.ndim == 3:
        header = [2051, *array.shape]
    else:
        header = [2049, len(array)]
    return b"".join(int(v).to_bytes(4, "big") for v in header) + array.astype(np.uint8).tobytes()


def _write(path: pathlib.Path, data: bytes, compress=True):
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@pytest.fixture
def data(tmp_path):
    """Tiny Fashion-MNIST: 8 training and 6 test images, gzipped like the originals."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    _write(folder / "train-images-idx3-ubyte.gz", _idx(_images(8, 0)))
    _write(folder / "train-labels-idx1-ubyte.gz", _idx(TRAIN_LABELS))
    _write(folder / "t10k-images-idx3-ubyte.gz", _idx(_images(6, 1)))
    _write(folder / "t10k-labels-idx1-ubyte.gz", _idx(TEST_LABELS))
    return folder


def _message(fn, *args, **kw):
    with pytest.raises(DataError) as err:
        fn(*args, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_classes():
    assert len(fm.CLASSES) == 10 and fm.CLASSES[0] == "t-shirt_top" and fm.CLASSES[9] == "ankle_boot"
    assert fm.DEFAULT_DIR == "/usr/share/datasets/fashion-mnist"


def test_read_idx(data, tmp_path):
    images = fm.read_idx(data / "train-images-idx3-ubyte.gz")
    assert images.dtype == np.uint8 and images.shape == (8, 28, 28) and (images == _images(8, 0)).all()
    labels = fm.read_idx(data / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (8,) and (labels == TRAIN_LABELS).all()
    plain = _write(tmp_path / "plain-idx3-ubyte", _idx(_images(3, 5)), compress=False)
    assert (fm.read_idx(plain) == _images(3, 5)).all()
    images[0, 0, 0] = 1  # a writable copy, not a view of the file's bytes


def test_read_idx_errors(tmp_path):
    bad = _write(tmp_path / "bad.gz", b"\x00\x00\x08\x02" + _idx(TRAIN_LABELS)[4:])
    message = _message(fm.read_idx, bad)
    assert str(bad) in message and "magic number 2050" in message
    short = _write(tmp_path / "short.gz", _idx(_images(2, 0))[:-5])
    assert "truncated" in _message(fm.read_idx, short) and str(short) in _message(fm.read_idx, short)
    long = _write(tmp_path / "long.gz", _idx(TRAIN_LABELS) + b"\x00")
    assert "longer than its header says" in _message(fm.read_idx, long)
    header_only = _write(tmp_path / "header.gz", _idx(_images(2, 0))[:12])
    assert "header needs 16" in _message(fm.read_idx, header_only)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(_idx(_images(2, 0)))[:-12])  # truncated gzip stream
    assert "cannot read IDX file" in _message(fm.read_idx, cut)
    assert "cannot read IDX file" in _message(fm.read_idx, tmp_path / "missing.gz")


def test_one_class_protocol(data):
    ds = fm.load_fashion_mnist(0, data_dir=data)
    assert (ds.name, ds.category) == ("fashion_mnist", "t-shirt_top")
    assert ds.train.names == ("train/t-shirt_top/00000", "train/t-shirt_top/00002", "train/t-shirt_top/00005")
    assert ds.train.images.shape == (3, 32, 32, 1) and ds.train.images.dtype == np.uint8
    source = _images(8, 0)
    assert (ds.train.images[1, 2:30, 2:30, 0] == source[2]).all()
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (ds.train.images[:, border] == 0).all() and ds.train.labels.tolist() == [0, 0, 0]

    assert ds.test.labels.tolist() == [1, 0, 1, 0, 1, 1] and ds.test.labels.dtype == np.int32
    assert ds.test.names == ("test/ankle_boot/00000", "test/t-shirt_top/00001", "test/pullover/00002",
                             "test/t-shirt_top/00003", "test/sneaker/00004", "test/sandal/00005")
    assert ds.test.defect_types == ("ankle_boot", "good", "pullover", "good", "sneaker", "sandal")
    assert (ds.test.images[4, 2:30, 2:30, 0] == _images(6, 1)[4]).all()
    assert ds.test.masks.shape == (6, 32, 32) and ds.test.masks.sum() == 0 and ds.test.full_masks is None
    assert (ds.test.original_sizes == 32).all()


def test_class_names_and_num_test(data):
    ds = fm.load_fashion_mnist("trouser", data_dir=data, num_test=3)
    assert ds.category == "trouser" and ds.train.names == ("train/trouser/00004",)
    assert ds.test.labels.tolist() == [1, 1, 1] and len(ds.test.names) == 3
    assert fm.load_fashion_mnist("8", data_dir=data).category == "bag"
    assert fm.load_fashion_mnist(np.int64(3), data_dir=data).train.names == ("train/dress/00001",
                                                                             "train/dress/00007")
    message = _message(fm.load_fashion_mnist, "boot", data_dir=data)
    assert "'boot'" in message and "ankle_boot" in message
    assert "unknown Fashion-MNIST class 10" in _message(fm.load_fashion_mnist, 10, data_dir=data)
    assert "no images of class 2" in _message(fm.load_fashion_mnist, 2, data_dir=data)
    assert "num_test" in _message(fm.load_fashion_mnist, 0, data_dir=data, num_test=0)


def test_other_image_size_resizes_the_padded_frame(data):
    ds = fm.load_fashion_mnist(0, image_size=64, data_dir=data)
    padded = fm.load_fashion_mnist(0, data_dir=data).train.images[0, ..., 0]
    expected = np.asarray(Image.fromarray(padded).resize((64, 64), Image.BILINEAR))
    assert ds.train.images.shape == (3, 64, 64, 1) and (ds.train.images[0, ..., 0] == expected).all()
    assert ds.test.masks.shape == (6, 64, 64) and (ds.test.original_sizes == 32).all()  # the padded frame
    assert (ds.train.original_sizes == 32).all()


def test_folder_from_env_and_missing_files(data, tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_FASHION_MNIST_DIR", str(data))
    assert len(fm.load_fashion_mnist(0).train) == 3
    assert fm.resolve_dir(tmp_path) == tmp_path  # the argument wins over the variable
    (data / "t10k-labels-idx1-ubyte.gz").unlink()
    message = _message(fm.load_fashion_mnist, 0)
    assert str(data / "t10k-labels-idx1-ubyte.gz") in message and "dataset-fashion-mnist" in message
    assert "FMJAX_FASHION_MNIST_DIR" in message
    # uncompressed files are read too
    _write(data / "t10k-labels-idx1-ubyte", _idx(TEST_LABELS), compress=False)
    assert len(fm.load_fashion_mnist(0).test) == 6
    assert "dataset-fashion-mnist" in _message(fm.load_fashion_mnist, 0, data_dir=tmp_path / "none")


def test_mismatched_files(data):
    _write(data / "t10k-labels-idx1-ubyte.gz", _idx(TEST_LABELS[:5]))
    message = _message(fm.load_fashion_mnist, 0, data_dir=data)
    assert "has 6 images but" in message and "5 labels" in message
    _write(data / "t10k-labels-idx1-ubyte.gz", _idx(_images(6, 1)))  # images where labels belong
    assert "not labels" in _message(fm.load_fashion_mnist, 0, data_dir=data)


def _real_files_present():
    folder = pathlib.Path(fm.DEFAULT_DIR)
    return all((folder / (name + ".gz")).is_file() for name in fm.FILES.values())


@pytest.mark.skipif(not _real_files_present(),
                    reason=f"Fashion-MNIST IDX files not installed in {fm.DEFAULT_DIR} "
                           f"(Debian package dataset-fashion-mnist)")
def test_real_files(monkeypatch):
    monkeypatch.delenv("FMJAX_FASHION_MNIST_DIR", raising=False)
    ds = fm.load_fashion_mnist(0)
    assert ds.train.images.shape == (6000, 32, 32, 1) and ds.test.images.shape == (10000, 32, 32, 1)
    assert int((ds.test.labels == 0).sum()) == 1000 and ds.test.defect_types.count("good") == 1000
    assert ds.train.images[:, :2].max() == 0 and ds.train.images[:, 2:30, 2:30].max() == 255
    counts = np.bincount(fm.read_idx(pathlib.Path(fm.DEFAULT_DIR) / "train-labels-idx1-ubyte.gz"), minlength=10)
    assert counts.tolist() == [6000] * 10


def test_stored_category_name_reloads_the_same_class(data, monkeypatch):
    """A run stores the class name; loading `fashion_mnist:1` with it (evaluate --run) works."""
    from fmjax import data as data_lib
    from fmjax.config import DataConfig

    monkeypatch.setenv(fm.ENV_VAR, str(data))
    cfg = DataConfig(image_size=32)
    by_name = data_lib.load("fashion_mnist:1", "trouser", cfg)
    assert by_name.category == "trouser" and by_name.train.names == data_lib.load("fashion_mnist:1", None, cfg).train.names
    assert "contradicts" in _message(data_lib.load, "fashion_mnist:1", "dress", cfg)


def test_stratified_subset_keeps_shares_and_is_the_same_for_every_class():
    from fmjax.data import stratified_subset
    from fmjax.data.base import normal_split

    true_class = np.repeat(np.arange(10), 30)  # 30 test images per class
    subsets = []
    for normal in (0, 3):
        split = normal_split(np.zeros((300, 4, 4, 1), np.uint8), [f"test/{i:03d}" for i in range(300)])
        kinds = tuple("good" if c == normal else fm.CLASSES[c] for c in true_class)
        split = dataclasses.replace(split, defect_types=kinds, labels=(true_class != normal).astype(np.int32))
        sub = stratified_subset(split, 50, seed=0)
        assert len(sub) == 50 and list(sub.names) == sorted(sub.names)
        assert sorted(np.bincount(true_class[[int(n[5:]) for n in sub.names]], minlength=10)) == [5] * 10
        subsets.append(sub.names)
    assert subsets[0] == subsets[1]
    assert stratified_subset(split, 0) is split and stratified_subset(split, 300) is split
    odd = stratified_subset(split, 7, seed=1)
    assert len(odd) == 7 and len(set(odd.names)) == 7
