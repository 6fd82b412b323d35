"""The flow reconstruction baseline as a `Method`: the flow model of Flow Mismatching,
scored by integrating its ODE from a noised test image."""
from __future__ import annotations

from fmjax.methods.base import Method
from fmjax.methods.flow_mismatch.method import flow_objective
from fmjax.methods.recon.scorer import ReconScorer

__all__ = ["METHOD", "Recon"]


class Recon(Method):
    name = "recon"
    model = "flow"  # the same network as flow_mismatch

    def objective(self, config):
        return flow_objective(config)

    def scorer(self, config, apply_fn, image_shape, devices=None) -> ReconScorer:
        return ReconScorer(apply_fn, config.score, image_shape, devices)

    def cost(self, config, image_shape, maps: bool = True) -> dict:
        """N steps (Heun: 2N) per image, strictly sequential."""
        calls = config.score.steps * (2 if config.score.method == "heun" else 1)
        return {"network_calls_per_image": calls, "sequential_calls_per_image": calls}


METHOD = Recon()
