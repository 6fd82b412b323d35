"""RADAR's per-run choice of its noising timestep and blur (`score.t_score = "auto"`,
`score.sobel_smooth_sigma = "auto"`), made when the run is fitted, on its own held-out
normal images: the validation protocol of experiments/select_radar.py on one data set.

The held-out normals are cut in two halves A and B (`data.split_halves`: whole groups,
e.g. tiles of a photo, when the data has them). Each half gets `REPEATS` self-supervised
defects per image (fmjax/data/synthetic.py, the other half as the paste source). For
each candidate setting an Isolation Forest is fitted on the features of one half and
scores the other half and its defects, both ways round; the criterion is the mean over
the two folds of (image AUROC + pixel AUROC) / 2. The best setting is chosen (criteria
within 0.001: the larger t_score, then the smaller blur). Brick-like textures choose
small timesteps, grass- and gravel-like ones large timesteps and more blur, which no
single default serves (docs/performance.md)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fmjax.errors import RunError
from fmjax.methods.maps import gaussian_smooth
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar.settings import AUTO, CHOICES, RadarSettings

__all__ = ["MIN_HOLDOUT", "REPEATS", "auto_fields", "choose", "criterion", "validation_images"]

REPEATS = 3  # self-supervised defects per held-out normal image
MIN_HOLDOUT = 4  # two halves of at least two images


def auto_fields(rc: RadarSettings) -> tuple:
    """The settings of CHOICES that `rc` leaves to the choice ("auto")."""
    return tuple(name for name in CHOICES if getattr(rc, name) == AUTO)


def validation_images(holdout, seed: int = 2) -> tuple[dict, dict]:
    """({"A", "B"}: uint8 [n,H,W,C] held-out normals, {"A", "B"}: (uint8 [REPEATS*n,H,W,C]
    defective copies, uint8 [REPEATS*n,H,W] their masks)), n the smaller half's size."""
    from fmjax import data
    from fmjax.data.synthetic import anomaly_set

    if holdout is None or len(holdout) < MIN_HOLDOUT:
        raise RunError(f"score.t_score / score.sobel_smooth_sigma = auto are chosen on at least {MIN_HOLDOUT} "
                       f"held-out normal images, the run holds {0 if holdout is None else len(holdout)}: "
                       f"set them (e.g. --set score.t_score=500 --set score.sobel_smooth_sigma=4)")
    a, b = data.split_halves(holdout)
    n = min(len(a), len(b))
    halves = {"A": a.images[:n], "B": b.images[:n]}
    defects = {k: anomaly_set(np.concatenate([halves[k]] * REPEATS), halves["B" if k == "A" else "A"], seed=seed + i)
               for i, k in enumerate("AB")}
    return halves, defects


def criterion(sobel_maps: dict, feats: dict, masks: dict, rc: RadarSettings) -> float:
    """Mean over the folds (forest on one half, the other half and its defects scored) of
    (image AUROC + pixel AUROC) / 2. sobel_maps, feats: {"A", "B", "VA", "VB"} (halves and
    their defects): float [N,H,W], float [N,F]; masks: {"A", "B"}: the defects' masks."""
    from fmjax.eval.metrics import image_metrics

    values = []
    for fit, test in (("A", "B"), ("B", "A")):
        forest = forest_lib.fit(feats[fit], rc)
        scores = forest_lib.score(forest, np.concatenate([feats[test], feats["V" + test]]))
        labels = np.r_[np.zeros(len(feats[test])), np.ones(len(feats["V" + test]))]
        pixels = np.concatenate([sobel_maps[test], sobel_maps["V" + test]]).ravel()
        pixel_labels = np.concatenate([np.zeros(sobel_maps[test].shape, np.uint8), masks[test]]).ravel()
        values.append((image_metrics(scores, labels)["image_auroc"]
                       + image_metrics(pixels, pixel_labels)["image_auroc"]) / 2)
    return float(np.mean(values))


def choose(rc: RadarSettings, noise_maps, holdout) -> tuple[RadarSettings, dict]:
    """(`rc` with its "auto" settings chosen, {"chosen_on": number of held-out normals,
    "criterion": the chosen setting's, "candidates": how many were read}).

    noise_maps(t_score, images uint8 [N,H,W,C]) -> the unblurred noise maps float32
    [N,H,W] at that timestep (`RadarScorer.noise_maps` of a scorer without blur)."""
    from fmjax.methods.radar.scorer import sobel_and_features

    fields = auto_fields(rc)
    if not fields:
        return rc, {}
    halves, defects = validation_images(holdout)
    images = {**halves, **{"V" + k: v[0] for k, v in defects.items()}}
    masks = {k: v[1] for k, v in defects.items()}
    grid = {name: CHOICES[name] if name in fields else (getattr(rc, name),) for name in CHOICES}
    read = jax.jit(lambda m, sigma, settings: sobel_and_features(gaussian_smooth(m, sigma), settings),
                   static_argnums=(1, 2))
    # the Sobel map and features read neither t_score nor the blur: one compiled `read` per
    # blur serves every t_score, all four image sets in one call
    features_only = dataclasses.replace(rc, t_score=0, sobel_smooth_sigma=0.0)
    names = sorted(images)
    ends = np.cumsum([len(images[k]) for k in names])[:-1]
    all_images = np.concatenate([images[k] for k in names])
    results = {}
    for t_score in grid["t_score"]:
        maps = noise_maps(int(t_score), all_images)
        for sigma in grid["sobel_smooth_sigma"]:
            settings = dataclasses.replace(rc, t_score=int(t_score), sobel_smooth_sigma=float(sigma))
            sobel_maps, feats = (dict(zip(names, np.split(np.asarray(o), ends)))
                                 for o in read(maps, float(sigma), features_only))
            results[(t_score, sigma)] = criterion(sobel_maps, feats, masks, settings)
    best = max(results, key=lambda k: (round(results[k], 3), k[0], -k[1]))
    chosen = dataclasses.replace(rc, t_score=int(best[0]), sobel_smooth_sigma=float(best[1]))
    return chosen, {"chosen_on": 2 * len(halves["A"]), "criterion": results[best], "candidates": len(results)}
