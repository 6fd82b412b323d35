"""Run a scorer exported by `fmjax export` with JAX and numpy only (no Flax, no model code).

    from fmjax import serving
    scorer = serving.load("exported/")                 # the folder `fmjax export --out` wrote
    maps, scores, anomalous = scorer(images)           # images [N,H,W,C]

`images`: uint8, or float in [0, 1] (floats above 1 are read as 0..255), any height and
width, C = 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped). They are converted to
the run's channels and resized to its square size as the command line reads image
files (bilinear with the filter widened when shrinking, as PIL; computed in float here,
so a pixel may differ from the command line's by one grey level); the exported program
then runs the method's whole jitted scorer with the run's parameters, fixed noise and
fitted arrays, on `batch` images per call. Returns maps float32 [N,H,W] at the input's
size, scores float32 [N] (higher = more anomalous) and anomalous bool [N] (the run's
decision: its image threshold, or RADAR's forest) or None when the run had nothing fitted.

The folder holds scorer.json (what the program expects and returns, the thresholds, the
SHA-256 of the other files), scorer.jaxexport (the serialized `jax.export.Exported`)
and arrays.npz (its parameter and constant arrays, read without pickles). A changed file
is refused with a one-line error.
"""
from __future__ import annotations

import json
import os
import types
from typing import NamedTuple

import numpy as np

from fmjax.errors import DataError, RunError
from fmjax.files import sha256_of

__all__ = ["ARRAYS", "FORMAT", "META", "PROGRAM", "ExportedScorer", "Scored", "load", "match_channels",
           "prepare", "resize_images", "resize_maps", "to_uint8"]

FORMAT = 1
META, PROGRAM, ARRAYS = "scorer.json", "scorer.jaxexport", "arrays.npz"
_FINISHES = ("scores", "isolation_forest")


class Scored(NamedTuple):
    """maps float32 [N,H,W] (or a list of [H_i, W_i]), scores float32 [N], anomalous
    bool [N] or None."""

    maps: object
    scores: np.ndarray
    anomalous: np.ndarray | None


# ----------------------------------------------------------------------------- preprocessing

def to_uint8(images) -> np.ndarray:
    """Images as uint8 in [0, 255]: uint8 as is; bool as 0 / 255; other integers must be
    in [0, 255]; floats in [0, 1] are scaled by 255, larger ones clipped to [0, 255]
    (the command line's rule for float image files), then rounded."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"integer images must be in [0, 255], got values in [{a.min()}, {a.max()}]")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)
    raise DataError(f"images must be uint8, integer or float arrays, got dtype {a.dtype}")


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N,H,W,C] (C = 1, 3 or 4) -> [N,H,W,channels]: alpha dropped, grey repeated,
    RGB to grey with PIL's weights (R 0.299, G 0.587, B 0.114 in 16-bit fixed point)."""
    c = images.shape[-1]
    if c == 4:
        images, c = images[..., :3], 3
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    rgb = images.astype(np.uint32)
    grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return grey.astype(np.uint8)[..., None]


def _weights(in_size: int, out_size: int) -> np.ndarray:
    """Bilinear resampling weights float64 [out, in]: a triangle filter widened by the
    shrink factor (PIL's BILINEAR), normalised per output pixel."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale
    w = np.clip(1.0 - np.abs(np.arange(in_size)[None, :] + 0.5 - centres[:, None]) / support, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _resize(x: np.ndarray, size) -> np.ndarray:
    """float64 [N,H,W,...] -> [N,size[0],size[1],...], width first, then height."""
    h, w = x.shape[1:3]
    if w != size[1]:
        x = np.einsum("ow,nhw...->nho...", _weights(w, size[1]), x)
    if h != size[0]:
        x = np.einsum("oh,nh...->no...", _weights(h, size[0]), x)
    return x


def resize_images(images: np.ndarray, size) -> np.ndarray:
    """uint8 [N,H,W,C] -> uint8 [N,size[0],size[1],C] (bilinear, widened when shrinking)."""
    if images.shape[1:3] == tuple(size):
        return images
    return np.clip(np.floor(_resize(images.astype(np.float64), size) + 0.5), 0, 255).astype(np.uint8)


def resize_maps(maps: np.ndarray, size) -> np.ndarray:
    """float [N,h,w] -> float32 [N,size[0],size[1]] (bilinear, as the command line's maps)."""
    if maps.shape[1:3] == tuple(size):
        return np.asarray(maps, np.float32)
    return _resize(np.asarray(maps, np.float64), size).astype(np.float32)


def prepare(images, image_shape) -> tuple[np.ndarray, tuple[int, int]]:
    """Any images [N,H,W,C] (see the module docstring) -> (uint8 [N, *image_shape], their (H, W));
    a one-line DataError for another rank or channel count."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape[1:3]:
        raise DataError(f"images must be [N, H, W, C] with C = 1, 3 or 4, got shape {list(a.shape)} (one image: "
                        f"image[None]; grey [N, H, W]: images[..., None])")
    size = a.shape[1:3]
    a = match_channels(to_uint8(a), image_shape[-1])
    return resize_images(a, image_shape[:2]), tuple(int(s) for s in size)


# ----------------------------------------------------------------------------- the exported scorer

class ExportedScorer:
    """An exported scorer (see the module docstring); call it on images. `image_shape`
    (H, W, C) is the run's, `batch` the images per program call, `meta` scorer.json."""

    def __init__(self, meta: dict, exported, arrays: list, finish_fitted=None):
        import jax

        self.meta = meta
        self.image_shape = tuple(int(s) for s in meta["image_shape"])
        self.batch = int(meta["batch"])
        self.method = meta["method"]
        self._exported = exported
        self._arrays = [jax.device_put(a) for a in arrays]
        from fmjax import xla_options  # jax only: the options the run's own scorer compiles with

        self._call = xla_options.jit(exported.call)
        self._forest = None
        if meta["finish"] == "isolation_forest":
            from fmjax.methods.radar import forest as forest_lib  # numpy only

            self._forest = forest_lib.from_fitted(finish_fitted)
        self.decision = meta.get("decision")

    def raw(self, images_u8: np.ndarray, class_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """The program on uint8 images already at the run's shape [N, *image_shape]:
        (maps float32 [N,H,W], image scores float32 [N])."""
        images_u8 = np.asarray(images_u8)
        if images_u8.ndim != 4 or images_u8.shape[1:] != self.image_shape or images_u8.dtype != np.uint8:
            raise DataError(f"images must be uint8 [N, {', '.join(map(str, self.image_shape))}], "
                            f"got {images_u8.dtype} {list(images_u8.shape)}")
        n = len(images_u8)
        ids = np.zeros(n, np.int32) if class_ids is None else np.asarray(class_ids, np.int32).reshape(-1)
        if ids.shape != (n,):
            raise DataError(f"class ids must be [{n}], got {list(np.shape(class_ids))}")
        maps, outputs = [], []
        for start in range(0, n, self.batch):
            chunk = images_u8[start:start + self.batch]
            pad = self.batch - len(chunk)
            m, o = self._call(self._arrays, np.pad(chunk, ((0, pad),) + ((0, 0),) * 3),
                              np.pad(ids[start:start + self.batch], (0, pad)))
            maps.append(np.asarray(m)[:len(chunk)])
            outputs.append(np.asarray(o)[:len(chunk)])
        if not maps:
            return np.zeros((0,) + self.image_shape[:2], np.float32), np.zeros(0, np.float32)
        maps, outputs = np.concatenate(maps), np.concatenate(outputs)
        if self._forest is not None:
            from fmjax.methods.radar import forest as forest_lib

            return maps, forest_lib.score(self._forest, outputs)
        return maps, outputs.astype(np.float32)

    def decide(self, scores) -> np.ndarray | None:
        """anomalous bool [N] by the run's decision, or None when it had none."""
        if not self.decision:
            return None
        rule, threshold = self.decision
        scores = np.asarray(scores)
        return scores > threshold if rule == ">" else scores >= threshold

    def __call__(self, images, class_ids=None) -> Scored:
        """Any images [N,H,W,C] -> Scored(maps [N,H,W] at their size, scores [N],
        anomalous [N] or None); class_ids int [N] for a class-conditional run."""
        prepared, size = prepare(images, self.image_shape)
        maps, scores = self.raw(prepared, class_ids)
        return Scored(resize_maps(maps, size), scores, self.decide(scores))


def load(path: str) -> ExportedScorer:
    """The scorer `fmjax export` wrote to folder `path`; RunError (one line) for a missing,
    changed or incompatible one."""
    from jax import export as jax_export

    meta_path = os.path.join(path, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{meta_path} is missing: {path} is not a folder written by fmjax export") from None
    except (OSError, ValueError) as err:
        raise RunError(f"{meta_path} is damaged ({' '.join(str(err).split())}): export again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("finish") not in _FINISHES:
        raise RunError(f"{meta_path} is not an fmjax export of format {FORMAT}: export again with this fmjax")
    for name in (PROGRAM, ARRAYS):
        file = os.path.join(path, name)
        if not os.path.exists(file) or sha256_of(file) != meta.get("sha256", {}).get(name):
            raise RunError(f"{file} is missing or not the file fmjax export wrote: export again")
    with open(os.path.join(path, PROGRAM), "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(path, ARRAYS), allow_pickle=False) as npz:
        arrays = [npz[f"c{i:05d}"] for i in range(int(meta["num_arrays"]))]
        finish_arrays = {name[2:]: npz[name] for name in npz.files if name.startswith("f_")}
    import jax

    platform = jax.devices()[0].platform
    here = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
    if not set(here) & set(exported.platforms):
        raise RunError(f"{path} was exported for {', '.join(exported.platforms)}, not for this machine's "
                       f"{platform}: export again with --platforms {here[0]}")
    fitted = types.SimpleNamespace(values=meta.get("finish_values") or {}, arrays=finish_arrays)
    return ExportedScorer(meta, exported, arrays, fitted if meta["finish"] != "scores" else None)
