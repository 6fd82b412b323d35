"""What evaluate and predict write: float32 TIFF maps at each image's original size in
the layout of MVTec's official evaluation, score tables and heat-map pictures. The
commands hand these writers staging folders and publish them whole (`fmjax.files.Outputs`);
every path built from a name is checked to stay inside its folder."""
from __future__ import annotations

import csv
import os

import numpy as np

from fmjax.eval import viz
from fmjax.files import inside, plain_name

__all__ = ["full_size_maps", "write_image_scores", "write_maps", "write_pictures", "write_predictions"]


def full_size_maps(split, maps):
    """Maps resized bilinearly to each image's original size (list of [H_i, W_i])."""
    return [viz.resize_map(m, tuple(size)) for m, size in zip(maps, split.original_sizes)]


def write_maps(out_dir: str, category: str, split, maps, scores, decided=None) -> None:
    """float32 TIFF maps at each image's original size, OUT/<category>/<name>.tiff (names
    are test/<defect>/<id>: the layout of MVTec's official evaluation), and the image
    scores behind the image metrics, OUT/<category>/image_scores.csv (image, label: 1 =
    anomalous, score, anomalous: the run's decision or empty). Map-based methods score the
    maps at the model's resolution (RADAR scores with its Isolation Forest), so the scores
    are written out rather than left to be recomputed from the resized TIFFs."""
    import tifffile

    category = plain_name(category, "category")
    for name, m in zip(split.names, full_size_maps(split, maps)):
        path = inside(out_dir, f"{category}/{name}.tiff", "image name")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tifffile.imwrite(path, np.asarray(m, np.float32))
    write_image_scores(out_dir, category, split, scores, decided)


def write_image_scores(out_dir: str, category: str, split, scores, decided=None) -> None:
    """OUT/<category>/image_scores.csv alone (image, label: 1 = anomalous, score,
    anomalous: the run's decision or empty), one row per test image in test order."""
    category = plain_name(category, "category")
    os.makedirs(os.path.join(out_dir, category), exist_ok=True)
    with open(os.path.join(out_dir, category, "image_scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "score", "anomalous"])
        for i, name in enumerate(split.names):
            writer.writerow([name, int(split.labels[i]), repr(float(scores[i])),
                             "" if decided is None else int(decided[i])])


def write_pictures(out_dir: str, split, maps, scores, vmax: float, limit: int = 24, threshold=None) -> list[str]:
    """Panels (image | overlay | map | mask) for up to `limit` test images, anomalous first,
    and with matplotlib (the `plots` extra) the figures of `fmjax.eval.plots` (ROC / PR,
    AUROC per defect type, score histogram with the image `threshold`); returns the
    figures' names."""
    from fmjax.eval import plots

    order = np.argsort(-split.labels, kind="stable")[:limit]
    os.makedirs(out_dir, exist_ok=True)
    tiles = []
    for i in order:
        tile = viz.panel(split.images[i], maps[i], vmax, split.masks[i])
        tiles.append(tile)
        viz.save_png(inside(out_dir, split.names[i].replace("/", "_") + ".png", "image name"), tile)
    viz.save_png(os.path.join(out_dir, "overview.png"), viz.grid(tiles, 2))
    return plots.write_figures(out_dir, split.labels, scores, split.defect_types, threshold)


def write_predictions(out_dir: str, paths, names, sizes, channels: int, maps, scores, decided, threshold,
                      vmax: float) -> list[dict]:
    """OUT/scores.csv (image, score, anomalous, threshold), OUT/overlays/<stem>.png and
    OUT/maps/<stem>.tiff at each image's own size; returns the csv rows."""
    import tifffile

    from fmjax.data import folder

    rows = []
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "maps"), exist_ok=True)
    for i, (path, name, size, m, s) in enumerate(zip(paths, names, sizes, maps, scores)):
        stem = plain_name(os.path.splitext(name)[0].replace("/", "_"), "image name")
        full = viz.resize_map(m, tuple(size))
        tifffile.imwrite(os.path.join(out_dir, "maps", stem + ".tiff"), full.astype(np.float32))
        image = folder.read_full_size(path, channels)  # overlays at the image's own size
        viz.save_png(os.path.join(out_dir, "overlays", stem + ".png"), viz.overlay(image, full, vmax))
        rows.append({"image": name, "score": float(s),
                     "anomalous": "" if decided is None else int(decided[i]),
                     "threshold": "" if threshold is None else threshold})
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "score", "anomalous", "threshold"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
