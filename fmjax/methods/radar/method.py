"""RADAR as a `Method`: a DDPM epsilon network trained on patches, scored by one noising
step and Sobel maps, decided by an Isolation Forest fitted on held-out normal images."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fmjax.errors import RunError
from fmjax.eval.calibration import thresholds
from fmjax.methods import image_bank
from fmjax.methods.base import Fitted, Method
from fmjax.methods.radar import choice
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar import standardize
from fmjax.methods.radar.ddpm import ddpm_objective
from fmjax.methods.radar.patches import patch_origins
from fmjax.methods.radar.scorer import RadarScorer

__all__ = ["METHOD", "Radar", "radar_metrics"]


def radar_metrics(labels, predicted_labels) -> dict:
    """Accuracy, precision, recall and F1 of 0/1 predictions (1 = anomalous).
    Precision (recall) is 0 when nothing is predicted (present) anomalous."""
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(predicted_labels).astype(bool).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.size} vs {p.size}")
    tp, fp, fn = int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # 2PR / (P + R) from the counts: thresholded_metrics' F1 exactly
    accuracy = float(np.mean(y == p)) if y.size else math.nan
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


class Radar(Method):
    name = "radar"
    model = "ddpm"
    decision_rule = "the Isolation Forest"

    def objective(self, config):
        return ddpm_objective(config)

    def fit_to_image_size(self, config):
        """Patches no larger than the image: on images smaller than score.patch_size (16x16
        digits) the patch is the whole image, scored once."""
        rc, side = config.score, config.data.image_size
        if rc.patch_size <= side:
            return config
        return config.replace(score=dataclasses.replace(rc, patch_size=side, patch_stride=min(rc.patch_stride, side)))

    def init_shape(self, config, image_shape) -> tuple:
        """The params are initialised at the patch shape (the U-Net is fully convolutional)."""
        return (config.score.patch_size, config.score.patch_size, image_shape[-1])

    def scorer(self, config, apply_fn, image_shape, devices=None) -> RadarScorer:
        features_fn = None
        if config.score.feature_knn:
            from fmjax.nets import unet

            module, _ = unet.build_model(config.net, image_shape)
            features_fn = image_bank.build_features_fn(module, conditional=False, clean_time=0.0)
        return RadarScorer(apply_fn, config.score, image_shape, devices, features_fn)

    def min_holdout(self, config) -> int:
        """Per-pixel statistics and the forest, or the two folds of the choice of t_score and
        blur, need two halves of the held-out normals."""
        return choice.MIN_HOLDOUT if config.score.normalize == "pixel" or choice.auto_fields(config.score) else 0

    def resolve_settings(self, run, trained, holdout) -> tuple:
        """score.t_score and score.sobel_smooth_sigma chosen on the held-out normals where
        they are "auto" (`choice.choose`)."""
        from fmjax.nets.unet import build_model

        rc = run.config.score
        if not choice.auto_fields(rc):
            return rc, {}
        _, apply_fn = build_model(run.config.net, run.image_shape)
        unblurred = RadarScorer(apply_fn, dataclasses.replace(rc, t_score=0, sobel_smooth_sigma=0.0), run.image_shape)
        return choice.choose(rc, lambda t_score, images: unblurred.noise_maps(run.params, images, t_score=t_score),
                             holdout)

    def fit(self, run, trained, holdout) -> Fitted:
        """The Isolation Forest on the features of the held-out normal images, which the
        network never trained on, then the pixel threshold from the same images' maps; the
        image decision is the forest's (image_threshold 0: anomalous where the score
        -decision_function is > 0). The forest is two-sided: fitted on training images,
        whose noise errors are lower than any unseen image's, it would flag unseen normals
        as readily as anomalies. Without at least 2 held-out normals
        (calibration.holdout_fraction = 0) it falls back to the training images, and
        calibration.json says so (forest_fitted_on). With score.normalize = pixel, one half
        of the held-out normals (`data.split_halves`) fits the per-pixel statistics
        (`standardize.fit`) and the other half the forest and the thresholds. With
        score.feature_knn, the memory bank comes first, from at most score.feature_bank of
        the images the network trained on (`trained`; a draw from score.forest_seed)."""
        from fmjax import data

        rc = run.config.score
        held_out = holdout is not None and len(holdout) >= 2
        source = "held_out_normals" if held_out else "training_images"
        values, arrays, for_forest = {}, {}, holdout if held_out else trained
        if rc.feature_knn:
            arrays.update(image_bank.to_arrays(image_bank.draw_bank(
                lambda images, class_ids: run.scorer.features(run.params, images, class_ids), trained,
                rc.feature_bank, rc.forest_seed)))
        if rc.normalize == "pixel":
            if holdout is None or len(holdout) < 4:
                raise RunError(f"score.normalize=pixel needs at least 4 held-out normal images, the run holds "
                               f"{0 if holdout is None else len(holdout)}: set score.normalize=none")
            for_stats, for_forest = data.split_halves(holdout)
            arrays.update(standardize.fit(run.scorer.noise_maps(run.params, for_stats.images, for_stats.class_ids)))
            values["num_normalization_images"] = len(for_stats)
        stats = Fitted(arrays=arrays)
        maps, feats = run.scorer.maps_and_features(run.params, for_forest.images, for_forest.class_ids, stats)
        forest = forest_lib.fit(feats, rc)
        forest_values, forest_arrays = forest_lib.to_fitted(forest)
        values.update(forest_values)
        arrays.update(forest_arrays)
        if holdout is not None:
            if not held_out:
                maps, feats = run.scorer.maps_and_features(run.params, holdout.images, holdout.class_ids, stats)
            values.update(thresholds(run.config.calibration, maps, forest_lib.score(forest, feats)))
        values.update(image_threshold=0.0, image_decision="isolation_forest", forest_fitted_on=source,
                      num_forest_images=len(for_forest))
        return Fitted(values=values, arrays=arrays)

    def program(self, run, apply_fn=None):
        """The base program with the forest's decision: anomalous where the score is > 0."""
        return dataclasses.replace(super().program(run, apply_fn), decision=(">", 0.0))

    def decide(self, scores, fitted: Fitted) -> np.ndarray:
        """The forest's own labels: anomalous exactly where the score is > 0."""
        return (np.asarray(scores) > 0).astype(np.int32)

    def metrics(self, labels, decided) -> dict:
        """radar_{accuracy,precision,recall,f1} at the forest's decision."""
        return {f"radar_{k}": v for k, v in radar_metrics(labels, decided).items()}

    def cost(self, config, image_shape, maps: bool = True) -> dict:
        """One network call per patch (and one for the features with score.feature_knn),
        all in one batched call (no sequential dependence)."""
        rc = config.score
        return {"network_calls_per_image": len(patch_origins(image_shape[0], image_shape[1], rc.patch_size,
                                                             rc.patch_stride)) + (1 if rc.feature_knn else 0),
                "sequential_calls_per_image": 1}


METHOD = Radar()
