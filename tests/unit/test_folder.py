import numpy as np
import pytest
from PIL import Image

from fmjax.data.base import DataError
from fmjax.errors import FmjaxWarning
from fmjax.data.folder import list_categories, load_folder, load_images, read_full_size

W, H = 40, 30  # source images are 40 wide, 30 high
S = 16


def _rgb(seed, w=W, h=H):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _grey(seed, w=W, h=H):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)
    return path


def _mask(top, left, h=8, w=10, value=255):
    m = np.zeros((H, W), np.uint8)
    m[top:top + h, left:left + w] = value
    return m


@pytest.fixture
def root(tmp_path):
    """Two categories in MVTec-AD layout: "rgbcat" (RGB) and "greycat" (grey)."""
    rgb = tmp_path / "rgbcat"
    for i in range(3):
        _save(rgb / "train/good" / f"{i:03d}.png", _rgb(i))
    (rgb / "train/good/notes.txt").write_text("not an image")
    (rgb / "train/good/.hidden.png").write_bytes(b"resource fork")
    _save(rgb / "test/good/000.png", _rgb(10))
    _save(rgb / "test/good/001.jpg", _rgb(11))
    _save(rgb / "test/crack/000.png", _rgb(12))
    _save(rgb / "test/crack/001.png", _rgb(13))
    _save(rgb / "ground_truth/crack/000_mask.png", _mask(3, 5))
    mask = _mask(20, 25)
    mask[0, 0] = 7  # any non-zero value is foreground
    _save(rgb / "ground_truth/crack/001.png", mask)  # plain <id>.png mask name

    grey = tmp_path / "greycat"
    for i in range(3):
        _save(grey / "train/good" / f"{i:03d}.png", _grey(20 + i))
    _save(grey / "test/good/000.png", _grey(30))
    _save(grey / "test/hole/000.png", _grey(31))
    _save(grey / "ground_truth/hole/000_mask.png", _mask(10, 10))

    (tmp_path / "not_a_category").mkdir()
    return tmp_path


def test_list_categories(root):
    assert list_categories(root) == ["greycat", "rgbcat"]


def test_rgb_category(root):
    ds = load_folder(root, "rgbcat", S)
    assert (ds.name, ds.category) == ("folder", "rgbcat")
    assert ds.train.images.shape == (3, S, S, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.names == ("train/good/000", "train/good/001", "train/good/002")
    assert ds.test.names == ("test/crack/000", "test/crack/001", "test/good/000", "test/good/001")
    assert ds.test.defect_types == ("crack", "crack", "good", "good")
    assert ds.test.labels.tolist() == [1, 1, 0, 0] and ds.test.labels.dtype == np.int32
    assert (ds.test.original_sizes == [H, W]).all() and (ds.train.original_sizes == [H, W]).all()
    # bilinear resize of the source
    expected = np.asarray(Image.fromarray(_rgb(12)).resize((S, S), Image.BILINEAR))
    assert (ds.test.images[0] == expected).all()
    assert (ds.train.images[1] == np.asarray(Image.fromarray(_rgb(1)).resize((S, S), Image.BILINEAR))).all()


def test_masks_nearest_and_full_size(root):
    ds = load_folder(root, "rgbcat", S)
    assert ds.test.masks.dtype == np.uint8 and set(np.unique(ds.test.masks)) == {0, 1}
    full = ds.test.full_masks
    assert [m.shape for m in full] == [(H, W)] * 4 and all(m.dtype == np.uint8 for m in full)
    assert (full[0] == (_mask(3, 5) > 0)).all()
    second = _mask(20, 25) > 0
    second[0, 0] = True
    assert (full[1] == second).all()
    assert full[2].sum() == 0 and full[3].sum() == 0
    assert ds.test.masks[2:].sum() == 0
    for small, big in zip(ds.test.masks[:2], full[:2]):
        expected = np.asarray(Image.fromarray(big * 255).resize((S, S), Image.NEAREST)) > 0
        assert (small == expected).all()


def test_grey_category_and_forced_channels(root):
    ds = load_folder(root, "greycat", S)
    assert ds.train.images.shape == (3, S, S, 1) and ds.test.images.shape == (2, S, S, 1)
    expected = np.asarray(Image.fromarray(_grey(31)).resize((S, S), Image.BILINEAR))
    assert ds.test.labels.tolist() == [0, 1]  # "good" < "hole"
    assert (ds.test.images[1, ..., 0] == expected).all()
    rgb = load_folder(root, "greycat", S, channels=3)
    assert rgb.test.images.shape == (2, S, S, 3)
    assert (rgb.test.images == ds.test.images).all()  # grey replicated into 3 channels
    grey = load_folder(root, "rgbcat", S, channels=1)
    assert grey.train.images.shape == (3, S, S, 1)
    with pytest.raises(DataError, match="channels"):
        load_folder(root, "rgbcat", S, channels=2)


def test_modes_16bit_palette_alpha(tmp_path):
    cat = tmp_path / "c"
    values = np.tile(np.arange(W, dtype=np.uint16) * 1600, (H, 1))  # up to 62400
    _save(cat / "train/good/a.png", values)  # saved as 16-bit grey
    assert Image.open(cat / "train/good/a.png").mode.startswith("I")
    grey_palette = Image.fromarray(_grey(1)).convert("P")
    grey_palette.save(cat / "train/good/b.png")
    rgba = np.dstack([_rgb(2), np.full((H, W), 128, np.uint8)])
    _save(cat / "test/good/a.png", rgba)
    with pytest.warns(FmjaxWarning, match="training images are grey but 1 test image"):
        ds = load_folder(tmp_path, "c", W)  # width kept; height stretched
    assert ds.train.images.shape[-1] == 1
    row = ds.train.images[0, 0, :, 0].astype(int)
    assert np.abs(row - np.arange(W) * 1600 / 257).max() <= 1  # 16-bit scaled to 8-bit
    # RGBA read as its RGB part, converted to grey like every image of the category
    expected = np.asarray(Image.fromarray(_rgb(2)).convert("L").resize((W, W), Image.BILINEAR))
    assert (ds.test.images[0, ..., 0] == expected).all()
    # a palette with colours makes the category RGB
    Image.fromarray(_rgb(3)).convert("P").save(cat / "train/good/0.png")
    with pytest.warns(FmjaxWarning, match="mixes grey and colour training images"):
        assert load_folder(tmp_path, "c", S).train.images.shape[-1] == 3


def test_grey_and_colour_training_images_are_read_as_rgb_with_one_warning(root, recwarn):
    """The rule for a category that mixes them: whichever comes first, every image is RGB
    (grey copied to R, G and B), and one warning says so."""
    first = root / "rgbcat" / "train" / "good" / "000.png"
    Image.open(first).convert("L").save(first)
    ds = load_folder(root, "rgbcat", S)
    assert ds.train.images.shape[-1] == 3 and ds.test.images.shape[-1] == 3
    grey = ds.train.images[0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert not (ds.train.images[1][..., 0] == ds.train.images[1][..., 1]).all()  # colour kept
    messages = [str(w.message) for w in recwarn if issubclass(w.category, FmjaxWarning)]
    assert len(messages) == 1 and "(1 grey, 2 colour)" in messages[0] and "data.channels" in messages[0]
    assert load_folder(root, "rgbcat", S, channels=1).train.images.shape[-1] == 1  # a choice: no warning
    assert len([w for w in recwarn if issubclass(w.category, FmjaxWarning)]) == 1


def _one_line_error(match, fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    for part in match:
        assert part in message, (part, message)
    return message


def test_missing_root_and_category(root):
    _one_line_error([str(root / "nope")], load_folder, root / "nope", "rgbcat", S)
    _one_line_error([str(root / "nope")], list_categories, root / "nope")
    _one_line_error([str(root / "wood"), "greycat, rgbcat"], load_folder, root, "wood", S)


def test_missing_or_empty_train(root):
    _one_line_error([str(root / "not_a_category" / "train" / "good")], load_folder, root, "not_a_category", S)
    (root / "not_a_category/train/good").mkdir(parents=True)
    (root / "not_a_category/train/good/readme.txt").write_text("x")
    _one_line_error([str(root / "not_a_category" / "train" / "good"), "no images"],
                    load_folder, root, "not_a_category", S)


def test_missing_test(root):
    for p in sorted((root / "greycat/test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "greycat/test").rmdir()
    _one_line_error([str(root / "greycat" / "test")], load_folder, root, "greycat", S)


def test_corrupt_image(root):
    bad = root / "rgbcat/test/good/002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _one_line_error([str(bad)], load_folder, root, "rgbcat", S)
    bad.write_bytes(b"plain text")
    _one_line_error([str(bad)], load_folder, root, "rgbcat", S)
    _one_line_error([str(bad)], load_images, bad, S)


def test_mask_size_mismatch(root):
    mask = root / "rgbcat/ground_truth/crack/000_mask.png"
    _save(mask, np.zeros((H + 2, W), np.uint8))
    image = root / "rgbcat/test/crack/000.png"
    _one_line_error([str(mask), str(image), f"{W}x{H + 2}", f"{W}x{H}"], load_folder, root, "rgbcat", S)


def test_missing_mask(root):
    (root / "rgbcat/ground_truth/crack/001.png").unlink()
    expected = root / "rgbcat" / "ground_truth" / "crack" / "001_mask.png"
    _one_line_error([str(expected), str(root / "rgbcat/test/crack/001.png")], load_folder, root, "rgbcat", S)


def test_a_category_without_any_mask_is_read_image_level_only_where_asked(root):
    """A one-class set: test/<other class>/ and no ground_truth/ at all. The plain folder
    reader (image_level=True, what `--data folder:ROOT` uses) reads it with all-zero masks
    and one warning; MVTec-AD's reader (image_level=False) still asks for the masks."""
    import shutil

    shutil.rmtree(root / "rgbcat" / "ground_truth")
    with pytest.warns(FmjaxWarning, match="none of its 2 anomalous test images has a mask") as caught:
        ds = load_folder(root, "rgbcat", S, image_level=True)
    assert len([w for w in caught if issubclass(w.category, FmjaxWarning)]) == 1
    assert list(ds.test.labels) == [1, 1, 0, 0] and ds.test.defect_types == ("crack", "crack", "good", "good")
    assert not ds.test.masks.any() and all(not m.any() for m in ds.test.full_masks)
    _one_line_error([str(root / "rgbcat/test/crack/000.png")], load_folder, root, "rgbcat", S)


def test_one_missing_mask_beside_others_is_an_error_even_image_level(root):
    (root / "rgbcat/ground_truth/crack/001.png").unlink()
    _one_line_error([str(root / "rgbcat/test/crack/001.png")], load_folder, root, "rgbcat", S, 0, True)


def test_load_images(root):
    images, names, sizes = load_images(root / "rgbcat/train/good", S)  # skips notes.txt and .hidden.png
    assert images.shape == (3, S, S, 3) and names == ("000", "001", "002")
    assert sizes.dtype == np.int32 and (sizes == [H, W]).all()
    single, names, _ = load_images(str(root / "greycat/test/hole/000.png"), S)
    assert single.shape == (1, S, S, 1) and names == ("000",)
    both, names, _ = load_images([root / "greycat/test/good/000.png", root / "rgbcat/test/good/001.jpg"], S, 3)
    assert both.shape == (2, S, S, 3)
    _one_line_error([str(root / "missing.png")], load_images, root / "missing.png", S)
    full = read_full_size(root / "rgbcat/test/good/000.png", 3)
    assert full.shape == (H, W, 3) and (full == _rgb(10)).all()
    grey = read_full_size(root / "greycat/test/good/000.png", 1)
    assert grey.shape == (H, W, 1) and (grey[..., 0] == _grey(30)).all()
    (root / "empty").mkdir()
    _one_line_error([str(root / "empty")], load_images, root / "empty", S)


def test_btad_layout_with_ok_and_ko(tmp_path):
    """BTAD names its normal folders "ok": train/ok, test/ok, test/ko, ground_truth/ko/<id>.png."""
    product = tmp_path / "01"
    for i in range(2):
        _save(product / "train/ok" / f"{i:04d}.bmp", _rgb(40 + i))
    _save(product / "test/ok/0000.bmp", _rgb(50))
    _save(product / "test/ko/0000.bmp", _rgb(51))
    _save(product / "ground_truth/ko/0000.png", _mask(4, 6))
    assert list_categories(tmp_path) == ["01"]
    ds = load_folder(tmp_path, "01", S)
    assert ds.train.images.shape == (2, S, S, 3) and ds.train.names == ("train/ok/0000", "train/ok/0001")
    assert ds.test.labels.tolist() == [1, 0]  # ko sorts before ok
    assert ds.test.defect_types == ("ko", "good")
    assert ds.test.names == ("test/ko/0000", "test/ok/0000")
    assert ds.test.full_masks[0].sum() == 8 * 10 and ds.test.full_masks[1].sum() == 0
