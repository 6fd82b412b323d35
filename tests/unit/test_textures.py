import dataclasses
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from fmjax.config import Config, TexturesConfig
from fmjax.data import textures
from fmjax.data.base import DataError

SIZE = 32
CONFIG = TexturesConfig(crop_size=64, num_train=6, num_test=40, anomaly_fraction=0.75, seed=3)


@pytest.fixture(scope="module", params=[(t, level) for t in textures.TEXTURES for level in textures.LEVELS])
def loaded(request):
    name, level = request.param
    config = dataclasses.replace(CONFIG, defects=level)
    return name, level, textures.load_textures(name, SIZE, config), textures.clean_crops(name, config, SIZE)


def test_shapes_labels_names(loaded):
    name, _, ds, _ = loaded
    s = SIZE
    assert (ds.name, ds.category) == ("textures", name)
    assert ds.train.images.shape == (6, s, s, 1) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (40, s, s, 1) and ds.test.masks.shape == (40, s, s)
    assert ds.train.labels.sum() == 0 and ds.train.masks.sum() == 0
    assert ds.train.names[0] == "train/good/000"
    assert ds.test.labels.dtype == np.int32 and ds.test.labels.sum() == 30
    for label, kind, name_, mask in zip(ds.test.labels, ds.test.defect_types, ds.test.names, ds.test.masks):
        assert (kind != "good") == bool(label) == bool(mask.any())
        assert name_.split("/")[:2] == ["test", kind]
    assert set(ds.test.defect_types) == {"good", *textures.DEFECT_KINDS}
    assert ds.test.full_masks is None
    assert (ds.test.original_sizes == [s, s]).all() and ds.test.original_sizes.dtype == np.int32


@pytest.mark.parametrize("fraction,num_test,expected", [(0.5, 5, 3), (0.3, 7, 2), (0.0, 4, 0), (1.0, 3, 3)])
def test_anomaly_count(fraction, num_test, expected):
    config = dataclasses.replace(CONFIG, num_train=1, num_test=num_test, anomaly_fraction=fraction)
    ds = textures.load_textures("gravel", SIZE, config)
    assert ds.test.labels.sum() == expected
    assert len(ds.test) == num_test


def test_defect_requirements(loaded):
    _, level, ds, (_, clean) = loaded
    limits = textures.LEVELS[level]
    img = ds.test.images[..., 0]
    for i in range(len(ds.test)):
        mask = ds.test.masks[i].astype(bool)
        assert set(np.unique(ds.test.masks[i])) <= {0, 1}
        # pixels outside the mask are bit-identical to the clean crop
        assert (img[i][~mask] == clean[i][~mask]).all()
        if not ds.test.labels[i]:
            continue
        area = mask.mean()
        assert limits.area[0] <= area <= limits.area[1], (i, area)
        change = np.abs(img[i].astype(float) - clean[i])
        assert (change[mask] > 0).mean() >= 0.9
        contrast = change[mask].mean() / clean[i].std()
        assert limits.contrast[0] <= contrast <= limits.contrast[1], (i, ds.test.defect_types[i], contrast)
        saturated = lambda x: ((x == 0) | (x == 255)).sum()
        assert saturated(img[i]) <= saturated(clean[i])
        # one defect: a single main connected part
        parts, count = ndimage.label(mask, np.ones((3, 3)))
        assert np.bincount(parts.ravel())[1:].max() >= 0.8 * mask.sum()


def test_normal_test_crops_untouched(loaded):
    _, _, ds, (_, clean) = loaded
    good = ds.test.labels == 0
    assert (ds.test.images[good, ..., 0] == clean[good]).all()
    assert ds.test.masks[good].sum() == 0


@pytest.mark.parametrize("kind", textures.DEFECT_KINDS)
@pytest.mark.parametrize("level", textures.LEVELS)
def test_each_kind_at_default_size(kind, level):
    config = TexturesConfig(crop_size=128, num_train=0, num_test=12, seed=1)
    _, clean = textures.clean_crops("brick", config, 64)
    widths = []
    for i, crop in enumerate(clean):
        rng = np.random.default_rng(i)
        donor = textures.donor_patch("brick", config, 64, rng)
        image, mask = textures.add_defect(crop, kind, rng, donor, level)
        assert textures.defect_ok(crop, image, mask, level)
        assert (image[mask == 0] == crop[mask == 0]).all() and mask.any()
        m = mask.astype(bool)
        if kind == "scratch":
            widths.append(m.sum() / skeletonize(m).sum())
        else:  # solid regions: few holes
            assert ndimage.binary_fill_holes(m).sum() <= 1.1 * m.sum()
    if kind == "scratch":
        assert max(widths) <= (4.0 if level == "subtle" else 6.5), widths  # thin lines, a few pixels at most


def test_cutpaste_uses_another_texture():
    config = TexturesConfig(crop_size=64, seed=0)
    rng = np.random.default_rng(0)
    donor = textures.donor_patch("grass", config, 32, rng)
    assert donor.shape == (32, 32) and donor.dtype == np.uint8
    with pytest.raises(DataError):
        textures.add_defect(donor, "cutpaste", rng, None)
    with pytest.raises(DataError, match="known"):
        textures.add_defect(donor, "dent", rng, donor)


def test_deterministic_and_seeded():
    a = textures.load_textures("grass", SIZE, CONFIG)
    b = textures.load_textures("grass", SIZE, CONFIG)
    c = textures.load_textures("grass", SIZE, dataclasses.replace(CONFIG, seed=4))
    for split in ("train", "test"):
        x, y, z = (getattr(d, split) for d in (a, b, c))
        assert (x.images == y.images).all() and (x.masks == y.masks).all() and x.names == y.names
        assert not (x.images == z.images).all()
    assert a.test.defect_types == b.test.defect_types


def test_crop_boxes_respect_their_regions():
    """tiles: training crops in the corner and centre tiles of a 3 x 3 grid, test crops in the
    other four; halves (and crops wider than a tile): top half and bottom half."""
    halves = dataclasses.replace(CONFIG, layout="halves")
    for config, size in ((halves, SIZE), (TexturesConfig(crop_size=256, num_train=20, num_test=20), 64)):
        train, test = textures.crop_boxes("brick", config, size)
        c = config.crop_size
        assert train.shape == (config.num_train, 4) and test.shape == (config.num_test, 4)
        assert (train[:, 0] >= 0).all() and (train[:, 2] <= 256).all()
        assert (test[:, 0] >= 256).all() and (test[:, 2] <= 512).all()
        assert (train[:, 2] - train[:, 0] == c).all() and (test[:, 3] - test[:, 1] == c).all()
        assert (train[:, 1] >= 0).all() and (test[:, 3] <= 512).all()
    config = TexturesConfig(num_train=200, num_test=200)
    assert config.layout == "tiles"
    train, test = textures.crop_boxes("brick", config, SIZE)

    def tiles(boxes):  # the 3 x 3 grid's (row, column) of each box, which lies inside it
        row, col = boxes[:, 0] // 170, boxes[:, 1] // 170
        assert ((boxes[:, 2] - 1) // 170 == row).all() and ((boxes[:, 3] - 1) // 170 == col).all()
        return set(zip(row.tolist(), col.tolist()))

    assert tiles(train) == {(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)}
    assert tiles(test) == {(0, 1), (1, 0), (1, 2), (2, 1)}
    for boxes in (train, test):
        assert (boxes[:, 2] - boxes[:, 0] == 128).all() and (boxes[:, 3] - boxes[:, 1] == 128).all()
    assert len({tuple(b) for b in train}) > 1  # random positions, not one fixed crop
    with pytest.raises(DataError, match="textures.layout"):
        textures.crop_boxes("brick", dataclasses.replace(CONFIG, layout="rows"), SIZE)


def test_a_config_written_before_the_tiles_keeps_its_halves():
    written = json.loads(Config().to_json())
    assert written["textures"]["layout"] == "tiles"
    del written["textures"]["layout"]
    assert Config.from_dict(written).textures.layout == "halves"


@pytest.mark.parametrize("layout, count", [("tiles", 5), ("halves", 3)])
def test_training_regions_share_no_pixels_and_a_hold_out_takes_whole_regions(layout, count):
    from fmjax.data import split_holdout

    config = TexturesConfig(num_train=40, num_test=4, layout=layout)
    train, _ = textures.crop_boxes("grass", config, SIZE)
    groups = textures.train_groups(config)
    assert sorted(set(groups.tolist())) == list(range(count))
    assert len(set(train[:, 1].tolist())) > count  # crops move across their region too
    for i in range(len(train)):
        for j in range(len(train)):
            overlap = (min(train[i, 2], train[j, 2]) > max(train[i, 0], train[j, 0])
                       and min(train[i, 3], train[j, 3]) > max(train[i, 1], train[j, 1]))
            if groups[i] != groups[j]:
                assert not overlap, (i, j)
    split = textures.load_textures("grass", SIZE, config).train
    assert (split.groups == groups).all()
    fit, held = split_holdout(split, 0.1, 0, 0)  # 4 images asked: two whole regions held out
    assert len(fit) + len(held) == 40 and len(set(held.groups.tolist())) == 2
    assert len(held) == np.isin(groups, held.groups).sum() and not set(held.groups.tolist()) & set(fit.groups.tolist())
    # crops larger than a region: one region, any image may be held out
    big = TexturesConfig(crop_size=171, num_train=8, num_test=4, layout=layout)
    assert textures.region_count(big) == 1 and (textures.train_groups(big) == 0).all()


def test_crops_come_from_boxes():
    train_boxes, test_boxes = textures.crop_boxes("gravel", CONFIG, SIZE)
    train, test = textures.clean_crops("gravel", CONFIG, SIZE)
    photo = textures.texture_photo("gravel").astype(float)
    for crops, boxes in ((train, train_boxes), (test, test_boxes)):
        top, left, bottom, right = boxes[0]
        # 64 -> 32 area resize is the mean of 2x2 blocks
        expected = photo[top:bottom, left:right].reshape(32, 2, 32, 2).mean(axis=(1, 3))
        assert np.abs(crops[0] - expected).max() <= 1.0


def test_bad_arguments():
    with pytest.raises(DataError, match="brick, grass, gravel"):
        textures.load_textures("marble", SIZE, CONFIG)
    with pytest.raises(DataError, match="crop_size"):
        textures.load_textures("brick", SIZE, dataclasses.replace(CONFIG, crop_size=300))
    with pytest.raises(DataError, match="anomaly_fraction"):
        textures.load_textures("brick", SIZE, dataclasses.replace(CONFIG, anomaly_fraction=1.5))


def test_levels_visible_by_default_subtle_as_before():
    """The default draws the visible defects; `subtle` is the earlier generator draw for draw
    (the digest of its output before the levels existed); visible defects change their
    region more; a config.json written before the levels keeps the data it was made with."""
    assert TexturesConfig().defects == "visible"
    digest = hashlib.sha256()
    for name in textures.TEXTURES:
        ds = textures.load_textures(name, 32, TexturesConfig(crop_size=64, num_train=2, num_test=12, seed=5,
                                                             defects="subtle", layout="halves"))
        digest.update(ds.test.images.tobytes())
        digest.update(ds.test.masks.tobytes())
    assert digest.hexdigest() == "342fd4b07bc7d23cf3c441fe285db3a7fd435cd94038e2a1c9d9faf58a3bb68e"

    def contrasts(level):
        config = TexturesConfig(crop_size=128, num_train=0, num_test=24, defects=level)
        out = []
        for name in textures.TEXTURES:
            ds, clean = textures.load_textures(name, 64, config), textures.clean_crops(name, config, 64)[1]
            for image, mask, crop in zip(ds.test.images[..., 0], ds.test.masks.astype(bool), clean):
                if mask.any():
                    out.append(np.abs(image.astype(float) - crop)[mask].mean() / crop.std())
        return np.array(out)

    subtle, visible = contrasts("subtle"), contrasts("visible")
    assert visible.min() >= 0.8 and np.median(visible) > 1.5 * np.median(subtle)
    old = json.loads(Config().to_json())
    del old["textures"]["defects"]
    assert Config.from_dict(old).textures.defects == "subtle"
    with pytest.raises(DataError, match="defects"):
        textures.load_textures("brick", SIZE, dataclasses.replace(CONFIG, defects="loud"))
    with pytest.raises(DataError, match="level"):
        textures.add_defect(np.full((SIZE, SIZE), 100, np.uint8), "blob", np.random.default_rng(0), None, "loud")


@pytest.mark.parametrize("name", ["grass", "gravel"])
def test_visible_defects_at_the_photos_own_resolution(name):
    """At 128 px (crop_size 128: no downscaling) the photos' darkest pixels make most dark
    scratches saturate, so a visible scratch takes hundreds of draws on some crops."""
    data = textures.load_textures(name, 128, TexturesConfig())
    bad = data.test.labels == 1
    assert bad.sum() >= 10 and "scratch" in data.test.defect_types
    clean = textures.clean_crops(name, TexturesConfig(), 128)[1]
    for i in np.flatnonzero(bad):
        assert textures.defect_ok(clean[i], data.test.images[i, ..., 0], data.test.masks[i])
