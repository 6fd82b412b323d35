"""The Python API a notebook uses: `fmjax.train`, `fmjax.load` and the `Detector` they return.

    import fmjax
    det = fmjax.train("textures:brick", "runs/brick", preset="small")   # or fmjax.load("runs/brick")
    maps, scores, anomalous = det.score(images)   # any size, 1 or 3 channels, uint8 or float in [0, 1]
    det.evaluate()                                # the metrics of the run's test split
    det.export("exported/")                       # for fmjax.serving (jax and numpy only)

Every call goes through the same run folder, scorer and writers as the command line.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fmjax.config import Config, build
from fmjax.serving import Scored

__all__ = ["Detector", "Scored", "load", "train"]


def _start() -> None:
    from fmjax.app import launch

    launch.start(allocator=False)  # never restarts the calling process (a notebook kernel)


def _as_images(images) -> tuple[list[np.ndarray], bool]:
    """(list of [H,W,C] arrays, whether the input was one array [N,H,W,C])."""
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(images, (list, tuple)):
        array = np.asarray(images)
        if array.ndim != 4:
            from fmjax.errors import DataError

            raise DataError(f"images must be [N, H, W, C] or a list of [H, W] / [H, W, C] images, got shape "
                            f"{list(array.shape)} (one image: image[None])")
        return list(array), True
    return [np.asarray(image) for image in images], False


@dataclasses.dataclass
class Detector:
    """A trained run ready to score (`run`: the `fmjax.runs.Run` underneath; `overrides`:
    the scoring settings it was loaded with, if any)."""

    run: object
    overrides: tuple = ()

    @property
    def path(self) -> str:
        return self.run.path

    @property
    def config(self) -> Config:
        """The run's config, with the scoring settings its calibration was fitted with."""
        return self.run.config

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) every image is resized and converted to before scoring."""
        return self.run.image_shape

    @property
    def thresholds(self) -> dict:
        """What was fitted on held-out normal images: image_threshold, pixel_threshold, ..."""
        return {k: v for k, v in self.run.calibration.items() if not isinstance(v, (dict, list))}

    def prepare(self, images) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Images as the command line reads files: uint8 [N, *image_shape] (converted to the
        run's channels, resized bilinearly with PIL) and each one's own (H, W)."""
        from PIL import Image

        from fmjax.errors import DataError
        from fmjax.serving import match_channels, to_uint8

        items, _ = _as_images(images)
        h, w, c = self.image_shape
        out = np.zeros((len(items), h, w, c), np.uint8)
        sizes = []
        for i, image in enumerate(items):
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape[:2]:
                raise DataError(f"image {i} must be [H, W] or [H, W, C] with C = 1, 3 or 4, got {list(image.shape)}")
            image = match_channels(to_uint8(image)[None], c)[0]
            sizes.append(image.shape[:2])
            resized = Image.fromarray(image[..., 0] if c == 1 else image).resize((w, h), Image.BILINEAR)
            out[i] = np.asarray(resized, np.uint8).reshape(h, w, c)
        return out, sizes

    def score(self, images, class_ids=None) -> Scored:
        """Scores images: an array [N,H,W,C] or a list of [H,W] / [H,W,C] arrays of any sizes,
        uint8 or float in [0, 1], grey, RGB or RGBA. Returns Scored(maps: float32 [N,H,W] for
        an array input or a list of [H_i, W_i] for a list, at each image's own size; scores
        float32 [N], higher = more anomalous; anomalous bool [N] by the run's decision, or
        None). class_ids int [N]: the categories of a class-conditional run."""
        from fmjax.eval.viz import resize_map

        _, stacked = _as_images(images)
        prepared, sizes = self.prepare(images)
        maps, scores = self.run.score(prepared, class_ids)
        full = [resize_map(m, size) for m, size in zip(maps, sizes)]
        decided = self.run.decide(scores)
        anomalous = None if decided is None else decided.astype(bool)
        return Scored(np.stack(full) if stacked and full else full, scores, anomalous)

    def evaluate(self, data: str | None = None, category: str | None = None, maps_out: str | None = None,
                 pictures_out: str | None = None, scores_out: str | None = None) -> dict:
        """`fmjax evaluate`: every metric of a labelled test split (default: the run's own
        data and category); writes the metrics file and, if asked, maps, image scores and
        pictures."""
        from fmjax import data as data_lib
        from fmjax.app.evaluate import evaluate_all, evaluate_run, metrics_name

        spec = data or self.run.data_info.get("spec")
        category = category or self.run.data_info.get("category")
        if spec.startswith(("textures:", "fashion_mnist:")):
            category = None
        name = metrics_name(self.run, spec, category, self.overrides)
        if category == "all":
            return evaluate_all(self.run, spec, maps_out, pictures_out, metrics_file=name, scores_out=scores_out)
        trained_on = self.run.data_info.get("categories") or []
        dataset = data_lib.load(spec, category, self.config.data, self.config.textures)
        return evaluate_run(self.run, dataset, maps_out, pictures_out, metrics_file=name, scores_out=scores_out,
                            class_id=trained_on.index(category) if category in trained_on else 0)

    def predict(self, input_path, out_dir: str) -> list[dict]:
        """`fmjax predict`: scores image files; writes scores.csv, overlays and maps."""
        from fmjax.app.predict import predict

        return predict(self.run, input_path, out_dir)

    def calibrate(self, overrides: Sequence[str] = ()) -> "Detector":
        """`fmjax calibrate`: fits the thresholds again with scoring `overrides` and keeps them."""
        from fmjax.app.calibrate import calibrate

        return Detector(calibrate(self.path, list(overrides)))

    def export(self, out_dir: str, platforms: Sequence[str] | None = None) -> dict:
        """`fmjax export`: the scorer for `fmjax.serving.load(out_dir)`; returns its scorer.json."""
        from fmjax.app.export import export_run

        return export_run(self.run, out_dir, platforms)


def train(data: str, out: str, category: str | None = None, *, preset: str | None = None,
          method: str | None = None, config: Config | str | None = None, overrides: Sequence[str] = (),
          progress: bool = True, logdir: str | None = None) -> Detector:
    """`fmjax train`: trains on the normal images of `data` (textures:NAME, folder:ROOT,
    mvtec:ROOT, ...; `category` for folder-style data) into run folder `out`, fits the
    thresholds on held-out normals, returns the Detector. preset: as `fmjax train
    --preset` (default: the config file's, else auto, chosen from the training data);
    config: a Config, or a JSON / YAML file layered over the preset; overrides:
    ["section.field=value", ...] last; logdir: TensorBoard event files of the training
    (needs tensorboardX)."""
    import types

    from fmjax.app.train import AUTO, preset_name, resolve_auto, train_run
    from fmjax.config import apply_overrides

    _start()
    prepared = None
    if isinstance(config, Config):
        resolved = apply_overrides(config, list(overrides))
    elif preset_name(types.SimpleNamespace(preset=preset, config=config)) == AUTO:
        resolved, prepared, _ = resolve_auto(data, category, method, list(overrides), config)
    else:
        resolved = build(preset, method, list(overrides), config)
    return Detector(train_run(resolved, data, category, out, progress=progress, data=prepared, logdir=logdir))


def load(run_dir: str, overrides: Sequence[str] = ()) -> Detector:
    """A trained run folder as a Detector; overrides: scoring settings for this Detector
    only (thresholds fitted again on the held-out normals when they need it; the
    reason is in `Detector.run.refit`)."""
    from fmjax import runs

    _start()
    return Detector(runs.load_run(run_dir, list(overrides)), tuple(overrides))
