"""RADAR's per-run choice of t_score and blur (score.t_score / sobel_smooth_sigma = auto):
the criterion by hand, the choice of the setting whose maps find the defects, what it
reads, and the settings it leaves alone."""
import dataclasses

import numpy as np
import pytest
import scipy.ndimage

from fmjax.config import apply_overrides, build
from fmjax.data.base import Split
from fmjax.errors import ConfigError, RunError
from fmjax.methods.radar import choice
from fmjax.methods.radar.settings import AUTO, CHOICES, RadarSettings, validate_settings

SIDE = 16
AUTO_SETTINGS = RadarSettings(patch_size=8, patch_stride=4, n_estimators=50)


def smooth_normals(n: int, seed: int = 0) -> Split:
    """uint8 [n,16,16,1]: smooth gradients, so any drawn defect is a local change."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 190, SIDE)[None, :, None, None] + np.zeros((n, SIDE, SIDE, 1))
    images = ramp + rng.normal(0, 1.0, (n, SIDE, SIDE, 1)) + rng.uniform(-20, 20, (n, 1, 1, 1))
    return Split(images=np.clip(images, 0, 255).astype(np.uint8), masks=np.zeros((n, SIDE, SIDE), np.uint8),
                 labels=np.zeros(n, np.int32), names=tuple(f"train/good/{i:03d}" for i in range(n)),
                 defect_types=("good",) * n, original_sizes=np.full((n, 2), SIDE, np.int32))


def defect_finder(good_t: int):
    """noise_maps(t, images): at `good_t` the local deviation from a smooth image, which is
    where drawn defects are; at any other t noise that depends on nothing."""
    def noise_maps(t, images):
        x = images[..., 0].astype(np.float32)
        if t == good_t:
            return np.abs(x - scipy.ndimage.uniform_filter(x, (1, 7, 7), mode="reflect")).astype(np.float32)
        return np.random.default_rng(t).random(x.shape).astype(np.float32)
    return noise_maps


def test_the_choice_is_the_timestep_whose_maps_find_the_defects():
    held_out = smooth_normals(12)
    for good in (25, 250):
        chosen, report = choice.choose(AUTO_SETTINGS, defect_finder(good), held_out)
        assert chosen.t_score == good
        assert chosen.sobel_smooth_sigma in CHOICES["sobel_smooth_sigma"]
        assert report["chosen_on"] == 12 and report["candidates"] == len(CHOICES["t_score"]) * len(
            CHOICES["sobel_smooth_sigma"])
        assert report["criterion"] > 0.6
    # settings that are not auto stay as they are and are not searched
    fixed_blur = dataclasses.replace(AUTO_SETTINGS, sobel_smooth_sigma=2.0)
    chosen, report = choice.choose(fixed_blur, defect_finder(50), held_out)
    assert (chosen.t_score, chosen.sobel_smooth_sigma) == (50, 2.0)
    assert report["candidates"] == len(CHOICES["t_score"])
    nothing = dataclasses.replace(AUTO_SETTINGS, t_score=100, sobel_smooth_sigma=1.0)
    assert choice.choose(nothing, defect_finder(50), held_out) == (nothing, {})


def test_one_program_reads_the_noise_maps_of_every_candidate_timestep():
    """The choice reads every timestep through one scorer whose timestep is an argument of
    its compiled program: each map equals that of a program with the timestep as a
    constant (as in scoring), with no recompilation between timesteps."""
    import jax
    from test_radar import PARAMS, toy_apply

    from fmjax.flow import to_model_range
    from fmjax.methods.radar.scorer import RadarScorer, noise_maps

    rc = RadarSettings(patch_size=4, patch_stride=2, t_score=0, sobel_smooth_sigma=0.0, image_batch=2)
    images = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    shared = RadarScorer(toy_apply, rc, (8, 8, 1))
    maps = {}
    for t_score in CHOICES["t_score"]:
        maps[t_score] = shared.noise_maps(PARAMS, images, t_score=t_score)
        fixed = dataclasses.replace(rc, t_score=t_score)  # the timestep a constant of the program, as in scoring
        want = jax.jit(lambda p, x: noise_maps(toy_apply, p, to_model_range(x), shared.noise, fixed))(PARAMS, images)
        np.testing.assert_allclose(maps[t_score], want, rtol=1e-6, atol=1e-6)
    assert shared._noise_batches.fn._cache_size() == 1
    assert not np.allclose(maps[10], maps[500])
    np.testing.assert_array_equal(shared.noise_maps(PARAMS, images), shared.noise_maps(PARAMS, images, t_score=0))


def test_criterion_by_hand():
    rng = np.random.default_rng(1)
    feats = {k: rng.normal(0, 1, (10, 2)) for k in "AB"}
    feats.update({"V" + k: rng.normal(50, 1, (30, 2)) for k in "AB"})  # far above the normals
    masks = {k: np.zeros((30, 4, 4), np.uint8) for k in "AB"}
    for m in masks.values():
        m[:, :2] = 1
    maps = {k: np.zeros((10, 4, 4)) for k in "AB"}
    maps.update({"V" + k: np.where(masks[k], 1.0, 0.0) for k in "AB"})
    settings = dataclasses.replace(AUTO_SETTINGS, t_score=100, sobel_smooth_sigma=1.0)
    good = choice.criterion(maps, feats, masks, settings)
    assert good > 0.95  # the forest ties a few test normals beyond its fit half's range with the defects
    reversed_maps = {**maps, **{"V" + k: np.where(masks[k], 0.0, 1.0) for k in "AB"}}
    # pixel AUROC 1 against 0.2: the defect pixels (0) tie with the 160 normal images' pixels (0)
    # and lose to the 240 clean pixels of the defective images (1): 0.5 * 160 / 400
    assert good - choice.criterion(reversed_maps, feats, masks, settings) == pytest.approx((1.0 - 0.2) / 2)
    # each forest scores the half it was not fitted on: halves far apart look as strange as the defects
    apart = {**feats, "B": feats["B"] + 25.0}
    two_sided = dataclasses.replace(settings, one_sided=False)
    assert choice.criterion(maps, apart, masks, two_sided) < 0.85 < choice.criterion(maps, feats, masks, two_sided)


def test_too_few_held_out_normals_is_a_one_line_error():
    for held_out in (None, smooth_normals(3)):
        with pytest.raises(RunError, match="at least 4 held-out normal"):
            choice.choose(AUTO_SETTINGS, defect_finder(25), held_out)


def test_auto_in_settings_and_overrides():
    assert RadarSettings().t_score == AUTO and RadarSettings().sobel_smooth_sigma == AUTO
    config = apply_overrides(build("", "radar"), ["score.t_score=250", "score.sobel_smooth_sigma=2"])
    assert (config.score.t_score, config.score.sobel_smooth_sigma) == (250, 2.0)
    assert choice.auto_fields(config.score) == ()
    config = apply_overrides(config, ["score.t_score=auto"])
    assert choice.auto_fields(config.score) == ("t_score",)
    for bad in ("score.t_score=2.5", "score.t_score=soon", "score.sobel_smooth_sigma=wide",
                "score.sobel_smooth_sigma=-1"):
        with pytest.raises(ConfigError):
            validate_settings(apply_overrides(build("", "radar"), [bad]).score)
    with pytest.raises(ConfigError, match="normalize"):
        validate_settings(RadarSettings(normalize="pixel"))
