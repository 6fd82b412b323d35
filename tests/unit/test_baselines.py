"""The non-learned floors: exact patch nearest neighbours, maps and scores on small cases."""
import numpy as np
import pytest

from fmjax import baselines
from fmjax.errors import ConfigError


def test_extract_patches_order():
    images = np.arange(2 * 4 * 5 * 2, dtype=np.float32).reshape(2, 4, 5, 2)
    patches = baselines.extract_patches(images, 3)
    assert patches.shape == (2, 2, 3, 18)
    np.testing.assert_array_equal(patches[1, 1, 2], images[1, 1:4, 2:5].reshape(-1))


def test_nearest_distances_are_exact():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((300, 12)).astype(np.float32) + 50.0  # far from 0: cancellation-prone
    queries = np.concatenate([bank[:5] + 1e-3, rng.standard_normal((40, 12)).astype(np.float32) + 50.0])
    got = baselines.nearest_distances(queries, bank, chunk=16)  # 45 queries: padded to 48
    brute = np.sqrt(((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(got, brute, rtol=1e-5, atol=1e-5)
    assert got.shape == (45,) and got.dtype == np.float32


def brute_force_maps(train, test, patch, bank_idx):
    """Plain loops: the bank (patches of train at the flat indices bank_idx over (image,
    row, column)), each test patch's smallest distance to it, each pixel the mean over the
    patches covering it."""
    unit = lambda x: x.astype(np.float64) / 127.5 - 1.0
    train, test = unit(train), unit(test)
    n, h, w, _ = train.shape
    a, b = h - patch + 1, w - patch + 1
    bank = np.stack([train[i // (a * b), (i // b) % a:(i // b) % a + patch, i % b:i % b + patch].ravel()
                     for i in bank_idx])
    maps = np.zeros(test.shape[:3])
    for k, image in enumerate(test):
        total, count = np.zeros((h, w)), np.zeros((h, w))
        for y in range(a):
            for x in range(b):
                d = np.sqrt(((bank - image[y:y + patch, x:x + patch].ravel()) ** 2).sum(1)).min()
                total[y:y + patch, x:x + patch] += d
                count[y:y + patch, x:x + patch] += 1
        maps[k] = total / count
    return maps


@pytest.mark.parametrize("patch, bank_size", [(3, 40), (4, 10_000)])
def test_patch_nn_maps_equal_brute_force(patch, bank_size):
    rng = np.random.default_rng(patch)
    train = rng.integers(0, 256, (5, 9, 11, 2), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 9, 11, 2), dtype=np.uint8)
    test[1] = train[2]  # a normal image: every patch in the full bank
    model = baselines.PatchNN(patch=patch, bank_size=bank_size, seed=3).fit(train)
    total = 5 * (9 - patch + 1) * (11 - patch + 1)
    bank_idx = np.sort(np.random.default_rng(3).permutation(total)[:bank_size])
    maps, scores = model.score(test, batch=2)  # two batches
    want = brute_force_maps(train, test, patch, bank_idx)
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores, maps.reshape(3, -1).max(1))
    if bank_size >= total:
        assert np.abs(maps[1]).max() < 1e-3


def test_patch_nn_finds_the_foreign_square():
    rng = np.random.default_rng(1)
    # normal: vertical stripes with a random phase; the test image has a flat square
    def stripes(n):
        phase = rng.integers(0, 4, n)
        cols = (np.arange(20)[None, :] + phase[:, None]) % 4 < 2
        return np.repeat((60 + 120 * cols)[:, None, :], 20, axis=1)[..., None].astype(np.uint8)

    train, test = stripes(12), stripes(3)
    test[0, 6:12, 8:14] = 128
    model = baselines.PatchNN(patch=5, bank_size=500, smooth_sigma=0.0, seed=0).fit(train)
    assert model.bank.shape == (500, 25)
    maps, scores = model.score(test, batch=2)
    assert maps.shape == (3, 20, 20) and scores.shape == (3,)
    assert np.allclose(maps[1:], 0.0, atol=1e-3) and scores[0] > 1.0  # every normal patch is in the bank
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) in [(y, x) for y in range(5, 13) for x in range(7, 15)]
    np.testing.assert_array_equal(scores, maps.reshape(3, -1).max(1))
    small = baselines.PatchNN(patch=5, bank_size=10_000).fit(train)  # fewer patches than the bank: all kept
    assert len(small.bank) == 12 * 16 * 16
    with pytest.raises(ConfigError, match=">= 1"):
        baselines.PatchNN(patch=0)
    with pytest.raises(ConfigError, match="fit"):
        baselines.PatchNN().score(test)
    with pytest.raises(ConfigError, match="larger"):
        baselines.PatchNN(patch=21).fit(train)


def test_pca_floor():
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((3, 8 * 8))
    train = np.clip(128 + 20 * rng.standard_normal((40, 3)) @ basis, 0, 255).reshape(40, 8, 8, 1).astype(np.uint8)
    test = train[:4].copy()
    test[0, 2:4, 2:4] = 255
    maps, scores = baselines.PCAFloor(components=3).fit(train).score(test)
    assert maps.shape == (4, 8, 8) and scores.argmax() == 0
    assert maps[0, 2:4, 2:4].min() > maps[1:].max()
