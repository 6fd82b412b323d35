"""Flow Mismatching as a `Method`: trains the flow-matching velocity network, scores with
the mismatch between its velocity and the straight path's, thresholds on normals."""
from __future__ import annotations

import functools

from fmjax import flow
from fmjax.methods.base import Method
from fmjax.methods.flow_mismatch.scorer import Scorer
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

    def cost(self, config, image_shape) -> dict:
        """K * T network calls per image, all independent (one batched program)."""
        return {"network_calls_per_image": config.score.num_paths * config.score.num_times,
                "sequential_calls_per_image": 1}


METHOD = FlowMismatch()
