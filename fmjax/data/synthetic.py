"""Self-supervised anomalies, for the validation protocol and the learned map rule
(fmjax.methods.flow_mismatch.learned): defects an inspector would see,
made from any normal image (no test data, no labels): a foreign patch, a stain, a local
blur, a scratch and a crack, each with its pixel mask."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

KINDS = ("foreign", "stain", "blur", "scratch", "crack")


def _blob(rng, size: int) -> np.ndarray:
    """bool [size, size]: an irregular blob covering 0.5-8% of the image."""
    yy, xx = np.mgrid[:size, :size]
    for _ in range(50):
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 10, mode="wrap")
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        radius = np.sqrt(rng.uniform(0.01, 0.05) * size * size / np.pi)
        blob = np.hypot(yy - cy, xx - cx) / radius + 0.6 * field / (field.std() + 1e-9) < 1.0
        if 0.005 * size * size < blob.sum() < 0.08 * size * size:
            break
    return blob


def _stroke(rng, size: int, wiggle: float) -> np.ndarray:
    """float [size, size] in [0, 1]: a soft line of 30-60% of the side, straight or wiggly."""
    line = np.zeros((size, size))
    point, angle = rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.6) * size
    n = int(4 * length)
    turns = np.cumsum(rng.normal(0, wiggle, n))
    for turn in turns:
        point = point + (length / n) * np.array([np.sin(angle + turn), np.cos(angle + turn)])
        y, x = int(point[0]), int(point[1])
        if 0 <= y < size and 0 <= x < size:
            line[y, x] = 1.0
    line = ndimage.gaussian_filter(line, 0.6 * size / 64)
    return np.clip(line / (line.max() + 1e-9) * 1.5, 0, 1)


def add_anomaly(image: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator):
    """image, other: uint8 [S, S, C] normal images. Returns (uint8 [S, S, C] with a defect of
    `kind`, uint8 [S, S] mask of the changed pixels)."""
    size = image.shape[0]
    x = image.astype(np.float64)
    std, mean = x.std() + 1e-6, x.mean()
    soft = ndimage.gaussian_filter(_blob(rng, size).astype(float), 0.7)[..., None]
    if kind == "foreign":
        src = np.roll(other.astype(np.float64), tuple(rng.integers(0, size, 2)), (0, 1))
        src = (src - src.mean()) / (src.std() + 1e-6) * std + mean + rng.choice([-1, 1]) * std
        y = soft * src + (1 - soft) * x
    elif kind == "stain":
        y = x + soft * rng.choice([-1, 1]) * rng.uniform(1.5, 2.5) * std
    elif kind == "blur":
        y = soft * ndimage.gaussian_filter(x, (rng.uniform(2.5, 4.0) * size / 64,) * 2 + (0,)) + (1 - soft) * x
    elif kind in ("scratch", "crack"):
        line = _stroke(rng, size, 0.15 if kind == "crack" else 0.02)[..., None]
        sign = -1 if kind == "crack" else rng.choice([-1, 1])
        y = x + line * sign * rng.uniform(2.0, 3.0) * std
    else:
        raise ValueError(f"unknown anomaly kind {kind!r} (known: {', '.join(KINDS)})")
    out = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    mask = np.any(np.abs(out.astype(int) - image) > 2, axis=-1)
    return out, ndimage.binary_closing(mask, iterations=1).astype(np.uint8) | mask.astype(np.uint8)


def anomaly_set(images: np.ndarray, others: np.ndarray, seed: int):
    """One defect per image, kinds in turn: (uint8 [N, S, S, C], uint8 [N, S, S])."""
    rng = np.random.default_rng(seed)
    pairs = [add_anomaly(x, others[rng.integers(len(others))], KINDS[i % len(KINDS)], rng)
             for i, x in enumerate(images)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
