"""Flow reconstruction baseline: exact fields with known reconstructions, the scorer, checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from fmjax.flow import integrate, to_model_range
from fmjax.methods.maps import image_score
from fmjax.methods.recon import scorer as recon
from fmjax.methods.recon.settings import ReconSettings as ReconConfig

SHAPE = (8, 8, 3)


def point_mass_apply(arrival: float = 1.0):
    """Exact velocity of the straight-line flow to x* = params reaching it at time
    `arrival`: v(x, t) = (x* - x) / (arrival - t).  arrival = 1 is the point-mass law."""
    def apply(params, x, t, y=None):
        return (params[None] - x) / (arrival - t)[:, None, None, None]
    return apply


def star_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)


@pytest.mark.parametrize("t0", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_reconstructs_the_point_mass_exactly(t0, steps):
    star_u8 = star_image()
    x_star = to_model_range(star_u8)
    noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    other = star_u8.copy()
    other[2:5, 3:7] = 255 - other[2:5, 3:7]
    images = np.stack([star_u8, other])
    maps = np.asarray(recon.recon_maps(point_mass_apply(), x_star, images, noise, t0, steps, "euler"))
    assert maps.shape == (2, 8, 8)
    np.testing.assert_allclose(maps[0], 0.0, atol=1e-10)  # x* reproduces itself
    expected = np.sum(np.square(np.asarray(to_model_range(other)) - np.asarray(x_star)), axis=-1)
    assert expected[2:5, 3:7].min() > 0 and expected.sum() == pytest.approx(expected[2:5, 3:7].sum())
    np.testing.assert_allclose(maps[1], expected, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("t0, steps", [(0.2, 1), (0.5, 4), (0.1, 7)])
def test_heun_equals_euler_for_straight_line_fields(t0, steps):
    star_u8 = star_image(2)
    x_star = np.asarray(to_model_range(star_u8))
    noise = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    y = star_image(4)
    # every straight-line field is integrated exactly by both rules: the velocity is
    # constant along a step.  arrival 1.5 keeps Heun's last evaluation (at t = 1) off the
    # point-mass field's singularity.
    apply = point_mass_apply(1.5)
    euler = np.asarray(recon.recon_maps(apply, x_star, y[None], noise, t0, steps, "euler"))
    heun = np.asarray(recon.recon_maps(apply, x_star, y[None], noise, t0, steps, "heun"))
    np.testing.assert_allclose(heun, euler, rtol=1e-5, atol=1e-8)
    y_m = np.asarray(to_model_range(y))
    x_t0 = (1 - t0) * np.asarray(noise) + t0 * y_m
    y_hat = x_star + (x_t0 - x_star) * (1.5 - 1) / (1.5 - t0)
    np.testing.assert_allclose(euler[0], np.sum((y_m - y_hat) ** 2, -1), rtol=1e-4, atol=1e-6)
    # the point-mass field itself, integrated short of t = 1: both exact
    x0 = jnp.asarray(x_t0[None], jnp.float32)
    f = lambda x, t: point_mass_apply()(jnp.asarray(x_star), x, t)
    exact = x_star + (x_t0 - x_star) * (1 - 0.9) / (1 - t0)
    for method in ("euler", "heun"):
        np.testing.assert_allclose(np.asarray(integrate(f, x0, t0, 0.9, steps, method))[0], exact,
                                   rtol=1e-4, atol=1e-5)


def toy_apply(params, x, t, y=None):
    return params * jnp.tanh(jnp.roll(x, 1, axis=2)) - x * t[:, None, None, None]


def test_scorer_matches_direct_maps_and_rules():
    cfg = ReconConfig(t0=0.4, steps=3, method="heun", image_score="max_plus_top1", smooth_sigma=1.0,
                      image_batch=2)
    scorer = recon.ReconScorer(toy_apply, cfg, SHAPE)
    images = np.random.default_rng(5).integers(0, 256, (3,) + SHAPE, dtype=np.uint8)
    maps, scores = scorer.score(jnp.float32(0.8), images)
    raw = np.asarray(recon.recon_maps(toy_apply, jnp.float32(0.8), images, scorer.noise, 0.4, 3, "heun"))
    ref = np.stack([scipy.ndimage.gaussian_filter(m, 1.0, mode="reflect") for m in raw])
    np.testing.assert_allclose(maps, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores, image_score(jnp.asarray(ref), "max_plus_top1"), rtol=1e-5)
    flat = np.sort(ref.reshape(3, -1), axis=1)[:, ::-1]
    np.testing.assert_allclose(scores, flat[:, 0] + flat[:, :1].mean(1), rtol=1e-5)  # 1% of 64 px -> 1 px


def test_same_image_same_score_and_no_recompile():
    scorer = recon.ReconScorer(toy_apply, ReconConfig(steps=2, image_batch=1), SHAPE)
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (4,) + SHAPE, dtype=np.uint8)
    _, scores = scorer.score(jnp.float32(0.5), images)
    _, rev = scorer.score(jnp.float32(0.5), images[::-1])
    np.testing.assert_array_equal(rev[::-1], scores)
    for n in (1, 3, 5):
        scorer.score(jnp.float32(0.5), rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8))
    assert scorer._batches.fn._cache_size() == 1


@pytest.mark.parametrize("bad", [dict(t0=1.0), dict(t0=-0.1), dict(t0=1.5), dict(steps=0), dict(steps=-2),
                                 dict(method="rk4"), dict(image_score="p99"), dict(image_batch=0)])
def test_validation(bad):
    with pytest.raises(ValueError) as err:
        recon.ReconScorer(toy_apply, ReconConfig(**bad), SHAPE)
    assert "\n" not in str(err.value)
    if "t0" in bad or "steps" in bad:
        with pytest.raises(ValueError):
            recon.recon_maps(toy_apply, 1.0, np.zeros((1,) + SHAPE, np.uint8), np.zeros(SHAPE),
                             bad.get("t0", 0.5), bad.get("steps", 2), "euler")
