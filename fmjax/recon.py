"""Flow reconstruction baseline (METHOD.md section 3).

For a test image y and one noise image eps: start at x_{t0} = (1 - t0) eps + t0 y,
integrate dx/dt = v(x, t) from t0 to 1 (Euler or Heun, N fixed steps) to get the
reconstruction y_hat, and score map(p) = sum_c (y - y_hat)^2 in model range [-1, 1].
Same network as Flow Mismatching, so a comparison isolates the scoring rule; unlike
its K*T independent calls, the N (Heun: 2N) calls here are sequential.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.config import (  # ReconConfig is re-exported here
    ConfigError,
    RadarConfig,
    ReconConfig,
    ScoreConfig,
)
from fmjax.flow import integrate, path_point, to_model_range
from fmjax.mismatch import gaussian_smooth, image_score, parse_image_score
from fmjax.sharded import ImageBatches

METHODS = ("euler", "heun")


def validate_recon_config(rc: ReconConfig) -> None:
    """Raises ConfigError (a ValueError, one-line message) for settings that cannot work."""
    if not (isinstance(rc.t0, (int, float)) and 0.0 <= rc.t0 < 1.0):
        raise ConfigError(f"recon.t0 must be in [0, 1), got {rc.t0!r}")
    if not isinstance(rc.steps, int) or rc.steps < 1:
        raise ConfigError(f"recon.steps must be an integer >= 1, got {rc.steps!r}")
    if rc.method not in METHODS:
        raise ConfigError(f"recon.method must be one of {', '.join(METHODS)}, got {rc.method!r}")
    parse_image_score(rc.image_score)
    if rc.smooth_sigma < 0:
        raise ConfigError(f"recon.smooth_sigma must be >= 0, got {rc.smooth_sigma}")
    if rc.image_batch < 1:
        raise ConfigError(f"recon.image_batch must be >= 1, got {rc.image_batch}")


def reconstruct(velocity_fn, y, noise, t0: float, steps: int, method: str = "euler"):
    """y_hat [B,H,W,C]: integrate velocity_fn(x [B,...], t [B]) from x_{t0} to t = 1.

    y: [B,H,W,C] in [-1, 1]; noise: [H,W,C] (shared) or [B,H,W,C].
    """
    validate_recon_config(ReconConfig(t0=t0, steps=steps, method=method))
    eps = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), y.shape)
    x0 = path_point(eps, y, jnp.full((y.shape[0],), t0, jnp.float32))
    return integrate(velocity_fn, x0, float(t0), 1.0, steps, method)


def recon_maps(apply_fn, params, images_u8, noise, t0: float, steps: int, method: str = "euler", labels=None):
    """Reconstruction error maps float32 [B,H,W] = sum_c (y - y_hat)^2, y in [-1, 1].

    apply_fn(params, x [B,H,W,C], t [B], y [B] or None) -> v [B,H,W,C];
    images_u8: uint8 [B,H,W,C]; noise: [H,W,C] or [B,H,W,C].
    """
    y = to_model_range(images_u8)
    velocity = lambda x, t: apply_fn(params, x, t, labels).astype(jnp.float32)
    y_hat = reconstruct(velocity, y, noise, t0, steps, method)
    return jnp.sum(jnp.square(y - y_hat), axis=-1)


class ReconScorer:
    """The jitted reconstruction scorer (mirrors fmjax.mismatch.Scorer).

    apply_fn(params, x [n,H,W,C], t [n], y [n] or None) -> v [n,H,W,C].  Images are spread
    over `devices` (default: all local devices), `image_batch` per device per call, padded,
    so every call has the same shapes; one noise image (from noise_seed) serves all images.
    """

    def __init__(self, apply_fn, config: ReconConfig, image_shape, devices=None):
        validate_recon_config(config)
        self.config = config
        self.image_shape = tuple(int(s) for s in image_shape)
        self.noise = jax.random.normal(jax.random.PRNGKey(config.noise_seed), self.image_shape, jnp.float32)
        def local(params, images_u8, labels, noise):
            maps = recon_maps(apply_fn, params, images_u8, noise, config.t0, config.steps, config.method, labels)
            maps = gaussian_smooth(maps, config.smooth_sigma)
            return maps, image_score(maps, config.image_score)

        self._batches = ImageBatches(local, self.image_shape, config.image_batch, 1, 2, devices)
        self.mesh = self._batches.mesh
        self._fn = self._batches.fn

    def score(self, params, images, labels=None):
        """images uint8 [N,H,W,C] -> (maps float32 [N,H,W], scores float32 [N]) as numpy."""
        return self._batches(params, images, labels, self.noise)


def network_calls_per_image(config, image_shape=None) -> int:
    """Network evaluations needed to score one image.

    ReconConfig: N steps (Heun: 2N), strictly sequential.
    ScoreConfig (Flow Mismatching): K * T, all independent (batched).
    RadarConfig: one per patch, all in one batched call; needs image_shape (H, W[, C]).
    """
    if isinstance(config, ReconConfig):
        validate_recon_config(config)
        return config.steps * (2 if config.method == "heun" else 1)
    if isinstance(config, ScoreConfig):
        return config.num_paths * config.num_times
    if isinstance(config, RadarConfig):
        from fmjax import radar

        if image_shape is None:
            raise ConfigError("RADAR's network call count depends on the image size: pass image_shape")
        return radar.network_calls_per_image(config, image_shape)
    raise ConfigError(f"no network call count for {type(config).__name__}")


def sequential_calls_per_image(config) -> int:
    """Network calls that must run one after another per image: recon N (Heun 2N);
    Flow Mismatching and RADAR 1 (their calls are independent)."""
    if isinstance(config, ReconConfig):
        return network_calls_per_image(config)
    return 1
