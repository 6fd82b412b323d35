"""Flow Mismatching as a `Method`: trains the flow-matching velocity network, scores with
the mismatch between its velocity and the straight path's, thresholds on normals."""
from __future__ import annotations

import functools

from fmjax import flow
from fmjax.eval.calibration import thresholds
from fmjax.methods.base import Fitted, Method
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.scorer import Scorer, interior_times, time_weights
from fmjax.training.step import Augment, Objective

__all__ = ["METHOD", "FlowMismatch", "flow_objective"]


def flow_objective(config) -> Objective:
    """The flow-matching objective (flow.draw_noise, flow.loss) with the config's time
    sampler, flips and patch crops."""
    cfg = config.train
    draw = functools.partial(flow.draw_noise, sampler=cfg.t_sampler, mean=cfg.logit_normal_mean,
                             std=cfg.logit_normal_std)
    return Objective(draw=draw, loss=flow.loss, augment=Augment(bool(cfg.hflip), bool(cfg.vflip), cfg.patch_size))


class FlowMismatch(Method):
    name = "flow_mismatch"
    model = "flow"

    def objective(self, config) -> Objective:
        return flow_objective(config)

    def scorer(self, config, apply_fn, image_shape, devices=None) -> Scorer:
        return Scorer(apply_fn, config.score, image_shape, devices)

    def min_holdout(self, config) -> int:
        """Normalisation statistics need two held-out normals (four to fit them and the
        thresholds on different images)."""
        return 0 if config.score.normalize == "none" else 2

    def fit(self, run, train_images, holdout) -> Fitted:
        """Thresholds from held-out normals; with score.normalize global or pixel, first the
        normalisation statistics from one half of them (`normalize.fit_stats`), then the
        thresholds from the other half scored with those statistics (a slice of fewer than
        4 images serves both)."""
        settings = run.config.score
        if holdout is None or settings.normalize == "none":
            return super().fit(run, train_images, holdout)
        for_stats = for_thresholds = holdout
        if len(holdout) >= 4:
            half = len(holdout) // 2
            for_stats, for_thresholds = holdout.subset(slice(0, half)), holdout.subset(slice(half, None))
        per_time = run.scorer.per_time(run.params, for_stats.images, for_stats.class_ids)
        weights = time_weights(interior_times(settings.num_times), settings.time_weight)
        arrays = norm.to_arrays(norm.fit_stats(per_time, weights, settings.normalize))
        maps, scores = run.score(for_thresholds.images, for_thresholds.class_ids, Fitted(arrays=arrays))
        values = thresholds(run.config.calibration, maps, scores)
        return Fitted(values={**values, "num_normalization_images": len(for_stats)}, arrays=arrays)

    def cost(self, config, image_shape) -> dict:
        """K * T network calls per image, all independent (one batched program)."""
        return {"network_calls_per_image": config.score.num_paths * config.score.num_times,
                "sequential_calls_per_image": 1}


METHOD = FlowMismatch()
