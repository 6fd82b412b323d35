"""Heat-map pictures and result tables (numpy + PIL only)."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

# anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, orange, pale yellow)
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB [..., 3]."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    return np.round(_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] (C = 1 or 3) or [H, W] -> uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def overlay(image: np.ndarray, heat: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend of the image and its heat map scaled to [0, vmax]; uint8 [H, W, 3].

    image: uint8 [H, W, C]; heat: float [h, w] (resized bilinearly to H x W if needed).
    """
    rgb = to_rgb(image).astype(np.float32)
    heat = resize_map(heat, rgb.shape[:2])
    colour = colormap(heat / max(vmax, 1e-12)).astype(np.float32)
    return np.round((1 - alpha) * rgb + alpha * colour).astype(np.uint8)


def panel(image: np.ndarray, heat: np.ndarray, vmax: float, mask: np.ndarray | None = None) -> np.ndarray:
    """[image | overlay | heat map | mask contour (if given)] side by side, uint8 [H, n*W, 3]."""
    rgb = to_rgb(image)
    heat = resize_map(heat, rgb.shape[:2])
    parts = [rgb, overlay(image, heat, vmax), colormap(heat / max(vmax, 1e-12))]
    if mask is not None:
        parts.append(to_rgb((np.asarray(mask) > 0).astype(np.uint8) * 255))
    gap = np.full((rgb.shape[0], 2, 3), 255, np.uint8)
    out = [parts[0]]
    for p in parts[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=1)


def resize_map(heat: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a float map [h, w] to size (H, W), float32."""
    heat = np.asarray(heat, np.float32)
    if heat.shape == tuple(size):
        return heat
    return np.asarray(Image.fromarray(heat, mode="F").resize((int(size[1]), int(size[0])), Image.BILINEAR))


def save_png(path: str, rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.png"
    Image.fromarray(rgb).save(tmp)
    os.replace(tmp, path)


def grid(tiles, columns: int) -> np.ndarray:
    """Tiles uint8 [H, W, 3] of equal size -> one picture with `columns` per row."""
    rows = math.ceil(len(tiles) / columns)
    h, w = tiles[0].shape[:2]
    out = np.full((rows * (h + 4), columns * (w + 4), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + 4):r * (h + 4) + h, c * (w + 4):c * (w + 4) + w] = tile
    return out


def markdown_table(rows, columns, floatfmt: str = "{:.3f}") -> str:
    """rows: list of dicts -> a markdown table over `columns` (missing -> '-'; an interval,
    a pair of floats, as '[low, high]')."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else floatfmt.format(v)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
            return f"[{cell(v[0])}, {cell(v[1])}]"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
