"""Embedded default data: synthetic defects on real texture photos.

scikit-image ships 512x512 grey photos of brick, grass and gravel. Each photo is cut
into a 3 x 3 grid of tiles of 170 pixels (layout "tiles", for crops of up to 170
pixels): training crops come from the four corner tiles and the centre one, test crops
from the other four, so the splits never share source pixels and both cover every row
and column of the photo (whose perspective, lighting and grain change across it). The
training tiles are the split's `groups`:
a run holds out whole tiles, as new to the network as the test crops. Layout "halves"
(runs written before the tiles, and crops over 170 pixels): training crops from three
strips of the top half, test crops from the bottom half. A fraction of the test crops
gets one synthetic defect each, drawn at the working resolution, with a mask of exactly
the region it changed:

  cutpaste  an irregular patch of ANOTHER texture, matched to the local
            brightness, pasted with a feathered edge (foreign material);
  scratch   a thin smooth or jagged curve, darker or brighter than the surface,
            fading towards its ends;
  blob      an irregular smooth region with a brightness and/or contrast change
            (stain, worn or discoloured spot);
  noise     an irregular region with altered local statistics: added grain,
            local blur or a directional smear.

Two levels (`TexturesConfig.defects`, `LEVELS`): "visible" (the default) draws defects
an inspector finds in the overview at the crop's size, as in real inspection data: each
changes 1.5%-8% of the crop's pixels by a mean absolute amount of 0.8-2.5 times the
crop's own standard deviation (blurs and smears also shift the brightness: smudges). "subtle" is the earlier generator, draw for draw: 0.5%-8%
of the pixels, 0.3-1.5 standard deviations, most of its blobs and grain invisible to the
eye on grass and gravel. No defect saturates a pixel. Everything is deterministic given
`TexturesConfig.seed` (the config's `textures` section).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage, spatial

from fmjax.config import TexturesConfig
from fmjax.data.base import DataError, Dataset, Split, normal_split

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("cutpaste", "scratch", "blob", "noise")

PHOTO_SIZE = 512
HALF = PHOTO_SIZE // 2
MIN_IMAGE_SIZE = 16
STRIPS = 3  # tiles per side (layout "tiles") or strips of the top half ("halves")
STRIP = PHOTO_SIZE // STRIPS  # 170 pixels
LAYOUTS = ("tiles", "halves")


@dataclasses.dataclass(frozen=True)
class Level:
    """How strong the defects of one level are. area and contrast are the acceptance
    limits every defect satisfies (checked after rounding to uint8): the fraction of the
    crop's pixels in its mask, and its mean |change| inside the mask / the crop's std.
    The rest are the ranges the defect kinds draw from."""

    area: tuple  # (min, max) accepted
    contrast: tuple  # (min, max) accepted
    draw_area: tuple  # log-uniform range of a region's target area
    amplitude: tuple  # additive defects: mean |change| / crop std
    scratch_width: tuple  # px at a 128-px crop
    paste_shift: float  # cut-paste: brightness offset, up to this many crop stds
    paste_gain: tuple  # cut-paste: the donor's contrast, in crop stds
    flatten_gain: tuple  # blob "worn": the texture's contrast kept
    harsh_gain: tuple  # blob "harsh": the texture's contrast multiplied
    shift: tuple  # blob "worn"/"harsh" and "discoloured": brightness shift, in crop stds
    discolour_gain: tuple
    blur_sigma: tuple  # px at a 64-px crop
    smear_length: tuple  # px at a 64-px crop
    smudge_shift: float  # blur and smear also shift the brightness by this many crop stds (0: not)


LEVELS = {
    "subtle": Level(area=(0.005, 0.08), contrast=(0.3, 1.5), draw_area=(0.012, 0.06), amplitude=(0.45, 1.15),
                    scratch_width=(0.7, 2.0), paste_shift=0.4, paste_gain=(0.5, 1.1), flatten_gain=(0.15, 0.5),
                    harsh_gain=(1.6, 2.2), shift=(0.35, 0.8), discolour_gain=(0.4, 0.8), blur_sigma=(1.5, 3.0),
                    smear_length=(4.0, 9.0), smudge_shift=0.0),
    "visible": Level(area=(0.015, 0.08), contrast=(0.8, 2.5), draw_area=(0.02, 0.07), amplitude=(1.1, 2.0),
                     scratch_width=(2.0, 3.5), paste_shift=1.2, paste_gain=(0.9, 1.5), flatten_gain=(0.0, 0.15),
                     harsh_gain=(2.4, 3.0), shift=(0.9, 1.4), discolour_gain=(0.0, 0.3), blur_sigma=(3.0, 5.0),
                     smear_length=(9.0, 15.0), smudge_shift=0.7),
}

_MAX_TRIES = 2000


def texture_photo(name: str) -> np.ndarray:
    """The full source photo of texture `name`: read-only uint8 [512, 512] in [0, 255]."""
    if name not in TEXTURES:
        raise DataError(f"unknown texture {name!r} (known: {', '.join(TEXTURES)})")
    return _photo(name)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from skimage import data  # late import: keeps importing this module cheap

    photo = np.asarray(getattr(data, name)())
    if photo.ndim == 3:
        photo = photo[..., 0]
    photo = photo.astype(np.uint8)
    photo.flags.writeable = False
    return photo


def _check(name: str, config: TexturesConfig, image_size: int) -> None:
    if name not in TEXTURES:
        raise DataError(f"unknown texture {name!r} (known: {', '.join(TEXTURES)})")
    if not 1 <= config.crop_size <= HALF:
        raise DataError(f"textures.crop_size must be in [1, {HALF}] (half a {PHOTO_SIZE}-pixel photo), "
                        f"got {config.crop_size}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"data.image_size must be >= {MIN_IMAGE_SIZE} for the texture data, got {image_size}")
    if config.num_train < 0 or config.num_test < 0:
        raise DataError(f"textures.num_train and textures.num_test must be >= 0, "
                        f"got {config.num_train}, {config.num_test}")
    if config.seed < 0:
        raise DataError(f"textures.seed must be >= 0, got {config.seed}")
    if not 0.0 <= config.anomaly_fraction <= 1.0:
        raise DataError(f"textures.anomaly_fraction must be in [0, 1], got {config.anomaly_fraction}")
    if config.defects not in LEVELS:
        raise DataError(f"textures.defects must be one of {', '.join(LEVELS)}, got {config.defects!r}")
    if config.layout not in LAYOUTS:
        raise DataError(f"textures.layout must be one of {', '.join(LAYOUTS)}, got {config.layout!r}")


def _rng(config: TexturesConfig, name: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, TEXTURES.index(name), *stream])


def region_count(config: TexturesConfig) -> int:
    """How many groups of training crops share no source pixel (`regions`): 5 tiles or 3
    strips, 1 for crops larger than 170 pixels. A crop still moves both ways in its region
    (a 128-pixel one over 43 x 43 positions of a tile): the crops keep no common position,
    and their mean image stays flat (`fmjax.data.profile`)."""
    return len(regions(config)[0])


def regions(config: TexturesConfig) -> tuple[np.ndarray, np.ndarray]:
    """The source regions crops are drawn from, rows (top, left, bottom, right), bottom/right
    exclusive: int64 [region_count(config), 4] for the training groups, int64 [R, 4] for
    the test crops (test crop i lies in region i % R)."""
    if config.crop_size > STRIP:
        return np.array([[0, 0, HALF, PHOTO_SIZE]]), np.array([[HALF, 0, PHOTO_SIZE, PHOTO_SIZE]])
    if config.layout == "tiles":
        tiles = [(r * STRIP, c * STRIP, (r + 1) * STRIP, (c + 1) * STRIP) for r in range(STRIPS) for c in range(STRIPS)]
        return np.array(tiles[0::2]), np.array(tiles[1::2])  # a checkerboard: corners and centre train
    train = [(0, k * STRIP, HALF, (k + 1) * STRIP) for k in range(STRIPS)]
    return np.array(train), np.array([[HALF, 0, PHOTO_SIZE, PHOTO_SIZE]])


def crop_boxes(name: str, config: TexturesConfig, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source boxes of the training and test crops.

    Returns (train, test): int64 [num_train, 4] and [num_test, 4] boxes
    (top, left, bottom, right), bottom/right exclusive, in photo pixels, uniform over
    their regions (`regions`). Training box i lies in region i % region_count(config)
    (`train_groups`).
    """
    _check(name, config, image_size)
    c = config.crop_size

    def boxes(rng, n, region):
        region = np.asarray(region).reshape(-1, 4)
        top = region[:, 0] + rng.integers(0, region[:, 2] - region[:, 0] - c, n, endpoint=True)
        left = region[:, 1] + rng.integers(0, region[:, 3] - region[:, 1] - c, n, endpoint=True)
        return np.stack([top, left, top + c, left + c], axis=1).astype(np.int64).reshape(n, 4)

    train_regions, test_regions = regions(config)
    test_of = np.arange(config.num_test) % len(test_regions)
    train = boxes(_rng(config, name, 0), config.num_train, train_regions[train_groups(config)])
    return train, boxes(_rng(config, name, 1), config.num_test, test_regions[test_of])


def train_groups(config: TexturesConfig) -> np.ndarray:
    """int32 [num_train]: the region (`regions`) each training crop comes from."""
    return (np.arange(config.num_train) % region_count(config)).astype(np.int32)


def resize(crop: np.ndarray, size: int) -> np.ndarray:
    """Area (box) downscaling, bicubic upscaling: uint8 [c, c] -> uint8 [size, size]."""
    if crop.shape == (size, size):
        return crop.copy()
    method = Image.BOX if size < crop.shape[0] else Image.BICUBIC
    out = Image.fromarray(crop.astype(np.float32)).resize((size, size), method)
    return np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8)


def clean_crops(name: str, config: TexturesConfig, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and test crops before any defect: uint8 [N, S, S] in [0, 255], S = image_size."""
    train_boxes, test_boxes = crop_boxes(name, config, image_size)
    photo = texture_photo(name)
    size = image_size

    def cut(boxes):
        out = np.zeros((len(boxes), size, size), np.uint8)
        for i, (top, left, bottom, right) in enumerate(boxes):
            out[i] = resize(photo[top:bottom, left:right], size)
        return out

    return cut(train_boxes), cut(test_boxes)


def donor_patch(name: str, config: TexturesConfig, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a texture other than `name` for cut-paste: uint8 [S, S].

    Taken at the same scale as the crops (crop_size source pixels resized to
    image_size), anywhere in the other photo, randomly rotated by a multiple of
    90 degrees and possibly mirrored.
    """
    others = [t for t in TEXTURES if t != name]
    photo = texture_photo(others[rng.integers(len(others))])
    c = config.crop_size
    top, left = rng.integers(0, PHOTO_SIZE - c, 2, endpoint=True)
    patch = resize(photo[top:top + c, left:left + c], image_size)
    patch = np.rot90(patch, rng.integers(4))
    return np.ascontiguousarray(patch[:, ::-1] if rng.random() < 0.5 else patch)


# ---------------------------------------------------------------- defect shapes


def _smooth_noise(rng, size: int, sigma: float) -> np.ndarray:
    """Low-frequency noise with zero mean and unit std: float [size, size]."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _blob_field(rng, size: int, area: float, max_aspect: float = 2.5) -> np.ndarray:
    """Irregular blob of about `area` * size**2 pixels, fully inside the image.

    Returns f: float [size, size]; the blob is f < 1 and f grows outwards (about
    the distance from the centre relative to the local boundary radius). The
    outline is a randomly rotated ellipse whose radius is modulated by a few
    random harmonics plus fine boundary noise.
    """
    aspect = rng.uniform(1.0, max_aspect)
    semi_b = math.sqrt(area * size * size / (math.pi * aspect))
    semi_a = semi_b * aspect
    orders = np.arange(2, 7)
    amps = rng.uniform(0.0, 0.22, orders.size) / (orders - 1)
    phases = rng.uniform(0.0, 2 * math.pi, orders.size)
    rough = rng.uniform(0.0, 0.08)
    # farthest reach of the boundary from the centre, so the blob stays inside
    reach = semi_a * (1.0 + amps.sum()) / (1.0 - 2.0 * rough) + 1.0
    lo, hi = reach, size - 1.0 - reach
    if lo > hi:
        lo = hi = (size - 1.0) / 2.0
    cy, cx = rng.uniform(lo, hi, 2)
    theta = rng.uniform(0.0, math.pi)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    yy, xx = yy - cy, xx - cx
    u = (xx * math.cos(theta) + yy * math.sin(theta)) / semi_a
    v = (-xx * math.sin(theta) + yy * math.cos(theta)) / semi_b
    phi = np.arctan2(v, u)
    radius = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in zip(orders, amps, phases))
    noise = np.clip(_smooth_noise(rng, size, max(1.0, semi_b / 2.0)), -2.0, 2.0)
    return np.hypot(u, v) / radius + rough * noise


def _soft_alpha(f: np.ndarray, rng, floor: float = 0.35) -> np.ndarray:
    """Feathered opacity of the blob f < 1: float [S, S] in [0, 1], zero outside.

    The edge starts at `floor` rather than 0 so the faint rim is still a visible
    change, not a ring of pixels that differ by one grey level.
    """
    feather = rng.uniform(0.15, 0.6)
    ramp = np.clip((1.0 - f) / feather, 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)
    return np.where(f < 1.0, floor + (1.0 - floor) * ramp, 0.0)


def _area(rng, level: Level) -> float:
    return math.exp(rng.uniform(math.log(level.draw_area[0]), math.log(level.draw_area[1])))


# ------------------------------------------------------------- defect kinds
# Each returns (delta, scalable): the float change to add to the clean crop
# (zero outside the defect), and whether its amplitude may be rescaled freely
# (additive changes) or only kept as drawn (replacements of the content).


def _cutpaste(base, std, rng, donor, level):
    size = base.shape[0]
    f = _blob_field(rng, size, _area(rng, level), max_aspect=2.0)
    alpha = _soft_alpha(f, rng, floor=0.5)
    d = donor.astype(np.float64)
    d = (d - d.mean()) / (d.std() + 1e-6)
    mean_level = base[f < 1.0].mean() if (f < 1.0).any() else base.mean()
    patch = (mean_level + rng.uniform(-level.paste_shift, level.paste_shift) * std
             + d * std * rng.uniform(*level.paste_gain))
    return alpha * (patch - base), False


def _curve(rng, size: int, length: float) -> np.ndarray:
    """Points, about 0.25 px apart, of a smooth arc or a jagged crack: float [P, 2] (y, x)."""
    n = max(16, int(4 * length))
    t = np.linspace(0.0, 1.0, n)
    if rng.random() < 0.5:  # smooth arc: quadratic Bezier
        bend = rng.uniform(-0.35, 0.35) * length
        p0, p2 = np.array([0.0, 0.0]), np.array([0.0, length])
        p1 = np.array([bend, length / 2.0])
        pts = ((1 - t) ** 2)[:, None] * p0 + (2 * (1 - t) * t)[:, None] * p1 + (t ** 2)[:, None] * p2
    else:  # crack: a direction that wanders
        def wander(sigma):
            w = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma)
            return w / (w.std() + 1e-12)

        # slow drift plus jags every few pixels (4 points per pixel)
        heading = rng.uniform(0.2, 0.5) * wander(n / 6.0) + rng.uniform(0.2, 0.5) * wander(8.0)
        step = length / (n - 1)
        pts = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1) * step, axis=0)
    angle = rng.uniform(0.0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T
    pts -= pts.min(axis=0)
    margin = 2.0
    extent = pts.max(axis=0)
    room = size - 1.0 - 2.0 * margin
    if extent.max() > room:
        pts *= room / extent.max()
        extent = pts.max(axis=0)
    return pts + margin + rng.uniform(0.0, 1.0, 2) * (room - extent)


def _scratch(base, std, rng, donor, level):
    size = base.shape[0]
    scale = max(1.0, size / 128.0)  # widths are for <= 128 px; keep the same look when larger
    width = rng.uniform(*level.scratch_width) * scale  # anti-aliased: the changed band is about 1 px wider
    length = rng.uniform(0.3, 0.85) * size
    pts = _curve(rng, size, length)
    grid = np.stack(np.mgrid[:size, :size], -1).reshape(-1, 2).astype(np.float64)
    dist, nearest = spatial.cKDTree(pts).query(grid, distance_upper_bound=width + 2.0)
    dist = np.where(np.isfinite(dist), dist, np.inf).reshape(size, size)
    nearest = np.minimum(nearest, len(pts) - 1).reshape(size, size)
    cover = np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0)  # anti-aliased line coverage
    t = np.linspace(0.0, 1.0, len(pts))
    fade = np.sin(math.pi * t) ** 0.35 * (0.75 + 0.25 * np.tanh(ndimage.gaussian_filter1d(
        rng.standard_normal(len(pts)), len(pts) / 10.0) * 3.0))
    sign = -1.0 if rng.random() < 0.6 else 1.0
    return sign * std * cover * fade[nearest], True


def _blob(base, std, rng, donor, level):
    size = base.shape[0]
    f = _blob_field(rng, size, _area(rng, level))
    alpha = _soft_alpha(f, rng)
    inside = f < 1.0
    mean_level = base[inside].mean() if inside.any() else base.mean()
    sign = -1.0 if rng.random() < 0.55 else 1.0
    variant = rng.integers(3)
    shade = 1.0 + 0.3 * _smooth_noise(rng, size, max(1.0, size / 16.0))
    if variant == 0:  # stain: brightness shift with some internal variation
        change = sign * std * shade
    elif variant == 1:  # worn (flattened) or harsher texture, with a slight shift
        gain = rng.uniform(*level.flatten_gain) if rng.random() < 0.6 else rng.uniform(*level.harsh_gain)
        change = (gain - 1.0) * (base - mean_level) + level.shift[0] * sign * std * shade
    else:  # discoloration: both
        gain = rng.uniform(*level.discolour_gain)
        change = (gain - 1.0) * (base - mean_level) + level.shift[1] * sign * std * shade
    return alpha * change, variant == 0


def _noise(base, std, rng, donor, level):
    size = base.shape[0]
    f = _blob_field(rng, size, _area(rng, level))
    alpha = _soft_alpha(f, rng, floor=0.6)
    variant = rng.integers(3)
    scale = max(1.0, size / 64.0)
    if variant == 0:  # grain: added (slightly correlated) noise
        grain = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(0.0, 1.0) * scale)
        grain /= grain.std() + 1e-12
        return alpha * grain * std, True
    if variant == 1:  # local blur
        target = ndimage.gaussian_filter(base, rng.uniform(*level.blur_sigma) * scale, mode="reflect")
    else:  # directional smear
        n = int(round(rng.uniform(*level.smear_length) * scale)) | 1
        angle = rng.uniform(0.0, math.pi)
        kernel = np.zeros((n, n))
        r = np.linspace(-(n - 1) / 2.0, (n - 1) / 2.0, 4 * n)
        ys = np.rint((n - 1) / 2.0 + r * math.sin(angle)).astype(int)
        xs = np.rint((n - 1) / 2.0 + r * math.cos(angle)).astype(int)
        kernel[ys, xs] = 1.0
        target = ndimage.convolve(base, kernel / kernel.sum(), mode="reflect")
    if level.smudge_shift:  # a smudge: smoothed and darker or brighter
        target = target + (-1.0 if rng.random() < 0.5 else 1.0) * level.smudge_shift * std
    return alpha * (target - base), False


_KINDS = {"cutpaste": _cutpaste, "scratch": _scratch, "blob": _blob, "noise": _noise}


def defect_ok(clean: np.ndarray, image: np.ndarray, mask: np.ndarray, level: str = "visible") -> bool:
    """Whether a defect meets the area, contrast (LEVELS[level]) and no-saturation limits.

    clean, image: uint8 [S, S]; mask: {0, 1} [S, S] of the defect.
    """
    limits = LEVELS[level]
    mask = mask.astype(bool)
    area = mask.mean()
    if not limits.area[0] <= area <= limits.area[1]:
        return False
    change = np.abs(image.astype(np.float64) - clean)[mask].mean()
    contrast = change / (clean.std() + 1e-12)
    if not limits.contrast[0] <= contrast <= limits.contrast[1]:
        return False
    changed = image != clean
    if (changed & ~mask).any() or changed[mask].mean() < 0.9:
        return False
    parts, count = ndimage.label(mask, np.ones((3, 3)))
    if count > 1 and np.bincount(parts.ravel())[1:].max() < 0.8 * mask.sum():
        return False  # one defect, not scattered specks
    return not (changed & ((image == 0) | (image == 255))).any()


def add_defect(clean: np.ndarray, kind: str, rng: np.random.Generator,
               donor: np.ndarray | None = None, level: str = "visible") -> tuple[np.ndarray, np.ndarray]:
    """Adds one synthetic defect of `kind`, at strength `level` (LEVELS), to a clean crop.

    clean: uint8 [S, S] in [0, 255]. donor: uint8 [S, S] crop of another
    texture (required for "cutpaste"). Returns (image uint8 [S, S], mask uint8
    [S, S] in {0, 1}); the mask is the set of pixels whose value changed plus
    the few pixels inside the defect that rounding left unchanged, so pixels
    outside it equal `clean`. Draws are redrawn until the defect meets
    `defect_ok`.
    """
    if level not in LEVELS:
        raise DataError(f"unknown defect level {level!r} (known: {', '.join(LEVELS)})")
    strength = LEVELS[level]
    if kind not in _KINDS:
        raise DataError(f"unknown defect kind {kind!r} (known: {', '.join(DEFECT_KINDS)})")
    if kind == "cutpaste" and donor is None:
        raise DataError("a cutpaste defect needs a donor patch of another texture")
    base = clean.astype(np.float64)
    std = base.std()
    for _ in range(_MAX_TRIES):
        delta, scalable = _KINDS[kind](base, std, rng, donor, strength)
        if scalable:
            visible = np.abs(delta) >= 0.5
            if not visible.any():
                continue
            delta = delta * (rng.uniform(*strength.amplitude) * std / np.abs(delta[visible]).mean())
        image = np.clip(np.rint(base + delta), 0, 255).astype(np.uint8)
        changed = image != clean
        # pixels enclosed by the defect that rounding left unchanged still belong to it
        mask = changed | (ndimage.binary_fill_holes(changed) & (delta != 0))
        if defect_ok(clean, image, mask, level):
            return image, mask.astype(np.uint8)
    raise DataError(f"could not place a {kind} defect meeting the limits in {_MAX_TRIES} draws "
                    f"(crop std {std:.1f}): use another seed or crop_size")


def load_textures(name: str, image_size: int, config: TexturesConfig = TexturesConfig()) -> Dataset:
    """Textures dataset `name` (one of TEXTURES) at `image_size`.

    Train: config.num_train normal crops. Test: config.num_test crops, of which
    round(anomaly_fraction * num_test) (halves rounded up) carry one defect;
    the defect kinds cycle through DEFECT_KINDS in a random order, at strength
    config.defects (LEVELS). Images are
    uint8 [N, S, S, 1] in [0, 255]; masks uint8 [N, S, S] in {0, 1}.
    """
    _check(name, config, image_size)
    size = image_size
    train, test = clean_crops(name, config, image_size)
    n_test = len(test)
    n_bad = min(n_test, int(math.floor(config.anomaly_fraction * n_test + 0.5)))

    rng = _rng(config, name, 2)
    bad = np.sort(rng.permutation(n_test)[:n_bad])
    kinds = rng.permutation(np.resize(np.array(DEFECT_KINDS), n_bad)) if n_bad else []
    kind_of = {int(i): str(k) for i, k in zip(bad, kinds)}

    images = test.copy()
    masks = np.zeros((n_test, size, size), np.uint8)
    for i, kind in kind_of.items():
        drng = _rng(config, name, 3, i)
        donor = donor_patch(name, config, image_size, drng) if kind == "cutpaste" else None
        images[i], masks[i] = add_defect(test[i], kind, drng, donor, config.defects)

    types = tuple(kind_of.get(i, "good") for i in range(n_test))
    sizes = np.tile(np.array([[size, size]], np.int32), (n_test, 1))
    test_split = Split(
        images=images[..., None],
        masks=masks,
        labels=np.array([t != "good" for t in types], np.int32).reshape(n_test),
        names=tuple(f"test/{t}/{i:03d}" for i, t in enumerate(types)),
        defect_types=types,
        original_sizes=sizes,
    )
    train_split = normal_split(train[..., None], [f"train/good/{i:03d}" for i in range(len(train))],
                               groups=train_groups(config))
    return Dataset(name="textures", category=name, train=train_split, test=test_split)
