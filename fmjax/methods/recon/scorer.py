"""Flow reconstruction baseline (docs/method.md, section 3).

For a test image y and one noise image eps: start at x_{t0} = (1 - t0) eps + t0 y,
integrate dx/dt = v(x, t) from t0 to 1 (Euler or Heun, N fixed steps) to get the
reconstruction y_hat, and score map(p) = sum_c (y - y_hat)^2 in model range [-1, 1].
Same network as Flow Mismatching, so a comparison isolates the scoring rule; unlike
its K*T independent calls, the N (Heun: 2N) calls here are sequential.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.flow import integrate, path_point, to_model_range
from fmjax.methods.base import ScoringProgram
from fmjax.methods.batches import ImageBatches
from fmjax.methods.maps import gaussian_smooth, image_score
from fmjax.methods.recon.settings import ReconSettings, validate_settings

__all__ = ["ReconScorer", "recon_maps", "reconstruct"]


def reconstruct(velocity_fn, y, noise, t0: float, steps: int, method: str = "euler"):
    """y_hat [B,H,W,C]: integrate velocity_fn(x [B,...], t [B]) from x_{t0} to t = 1.

    y: [B,H,W,C] in [-1, 1]; noise: [H,W,C] (shared) or [B,H,W,C].
    """
    validate_settings(ReconSettings(t0=t0, steps=steps, method=method))
    eps = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), y.shape)
    x0 = path_point(eps, y, jnp.full((y.shape[0],), t0, jnp.float32))
    return integrate(velocity_fn, x0, float(t0), 1.0, steps, method)


def recon_maps(apply_fn, params, images_u8, noise, t0: float, steps: int, method: str = "euler", class_ids=None):
    """Reconstruction error maps float32 [B,H,W] = sum_c (y - y_hat)^2, y in [-1, 1].

    apply_fn(params, x [B,H,W,C], t [B], y [B] or None) -> v [B,H,W,C];
    images_u8: uint8 [B,H,W,C]; noise: [H,W,C] or [B,H,W,C].
    """
    y = to_model_range(images_u8)
    velocity = lambda x, t: apply_fn(params, x, t, class_ids).astype(jnp.float32)
    y_hat = reconstruct(velocity, y, noise, t0, steps, method)
    return jnp.sum(jnp.square(y - y_hat), axis=-1)


class ReconScorer:
    """The jitted reconstruction scorer.

    apply_fn(params, x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].  Images are spread
    over `devices` (default: all local devices), `image_batch` per device per call, padded,
    so every call has the same shapes; one noise image (from noise_seed) serves all images.
    """

    def __init__(self, apply_fn, settings: ReconSettings, image_shape, devices=None):
        validate_settings(settings)
        self.config = settings
        self.image_shape = tuple(int(s) for s in image_shape)
        self.noise = jax.random.normal(jax.random.PRNGKey(settings.noise_seed), self.image_shape, jnp.float32)

        def local(params, images_u8, class_ids, noise):
            maps = recon_maps(apply_fn, params, images_u8, noise, settings.t0, settings.steps, settings.method,
                              class_ids)
            maps = gaussian_smooth(maps, settings.smooth_sigma)
            return maps, image_score(maps, settings.image_score)

        self._local = local
        self._batches = ImageBatches(local, self.image_shape, settings.image_batch, 1, 2, devices)
        self.mesh = self._batches.mesh

    def program(self, params, fitted=None) -> ScoringProgram:
        """The per-device function `score` runs on every device, for export."""
        local = self._local
        return ScoringProgram(fn=lambda params, consts, images_u8, class_ids: local(
            params, images_u8, class_ids, consts["noise"]), consts={"noise": self.noise}, batch=self.config.image_batch)

    def score(self, params, images, class_ids=None, fitted=None):
        """images uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]) as numpy."""
        return self._batches(params, images, class_ids, self.noise)
