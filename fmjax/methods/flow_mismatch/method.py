"""Flow Mismatching as a `Method`: trains the flow-matching velocity network, scores with
the mismatch between its velocity and the straight path's, thresholds on normals."""
from __future__ import annotations

import functools

import numpy as np

from fmjax import flow
from fmjax.eval.calibration import thresholds
from fmjax.methods.base import Fitted, Method
from fmjax.methods.flow_mismatch import features as feat
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.scorer import Scorer, interior_times, time_weights
from fmjax.training.step import Augment, Objective

__all__ = ["METHOD", "FlowMismatch", "feature_bank", "flow_objective"]


def flow_objective(config) -> Objective:
    """The flow-matching objective (flow.draw_noise, flow.loss) with the config's time
    sampler, flips and patch crops."""
    cfg = config.train
    draw = functools.partial(flow.draw_noise, sampler=cfg.t_sampler, mean=cfg.logit_normal_mean,
                             std=cfg.logit_normal_std)
    return Objective(draw=draw, loss=flow.loss, augment=Augment(bool(cfg.hflip), bool(cfg.vflip), cfg.patch_size))


def feature_bank(run, trained) -> feat.Bank:
    """The feature memory bank (`features.Bank`) of at most score.feature_bank of the
    training images `trained` (a Split; a draw from score.seed), read with the run's
    scorer (built with score.feature_knn > 0)."""
    settings = run.config.score
    picked = np.arange(len(trained))
    if len(trained) > settings.feature_bank:
        order = np.random.default_rng([settings.seed, 13]).permutation(len(trained))
        picked = np.sort(order[:settings.feature_bank])
    return feat.bank_from_features(run.scorer.features(run.params, trained.images[picked],
                                                       trained.class_ids[picked]))


class FlowMismatch(Method):
    name = "flow_mismatch"
    model = "flow"

    def objective(self, config) -> Objective:
        return flow_objective(config)

    def scorer(self, config, apply_fn, image_shape, devices=None) -> Scorer:
        features_fn = None
        if config.score.feature_knn:
            from fmjax.nets import unet

            module, _ = unet.build_model(config.net, image_shape)
            features_fn = feat.build_features_fn(module, config.net.num_classes > 0)
        return Scorer(apply_fn, config.score, image_shape, devices, features_fn)

    def min_holdout(self, config) -> int:
        """Normalisation statistics need two held-out normals (four to fit them and the
        thresholds on different images)."""
        return 0 if config.score.normalize == "none" else 2

    def fit(self, run, trained, holdout) -> Fitted:
        """With score.feature_knn > 0, first the feature bank: the features of at most
        score.feature_bank of the images the network trained on (`trained`). With
        score.normalize global or pixel, the normalisation statistics from one half of the
        held-out normals (`normalize.fit_stats`). Then the thresholds from the other half
        (a slice of fewer than 4 images serves both), scored with what was fitted."""
        settings = run.config.score
        arrays = {}
        if settings.feature_knn:
            arrays.update(feat.to_arrays(feature_bank(run, trained)))
        if holdout is None:
            return Fitted(arrays=arrays)
        values, for_thresholds = {}, holdout
        if settings.normalize != "none":
            for_stats = holdout
            if len(holdout) >= 4:
                half = len(holdout) // 2
                for_stats, for_thresholds = holdout.subset(slice(0, half)), holdout.subset(slice(half, None))
            per_time = run.scorer.per_time(run.params, for_stats.images, for_stats.class_ids)
            weights = time_weights(interior_times(settings.num_times), settings.time_weight)
            arrays.update(norm.to_arrays(norm.fit_stats(per_time, weights, settings.normalize)))
            values["num_normalization_images"] = len(for_stats)
        maps, scores = run.score(for_thresholds.images, for_thresholds.class_ids, Fitted(arrays=arrays))
        return Fitted(values={**thresholds(run.config.calibration, maps, scores), **values}, arrays=arrays)

    def cost(self, config, image_shape) -> dict:
        """K * T network calls per image (one more for feature image scores), all
        independent (one batched program)."""
        s = config.score
        return {"network_calls_per_image": s.num_paths * s.num_times + (1 if s.feature_knn else 0),
                "sequential_calls_per_image": 1}


METHOD = FlowMismatch()
