"""fmjax's U-Net and scorer against the independent numpy reference (tests/references.py):
the same velocity from the same Flax parameters for three architectures, and class-
conditional mismatch maps of images with mixed labels equal to Flow Mismatching computed
by its definition."""
import dataclasses

import numpy as np
import pytest

from references import NumpyUNet, random_unet_params, reference_scores, unet_velocity

from fmjax.config import preset
from fmjax.methods.flow_mismatch.scorer import Scorer
from fmjax.nets.unet import build_model

SHAPE = (16, 16, 3)


def tiny(**net):
    config = preset("tiny")
    return config.replace(net=dataclasses.replace(config.net, **net))


# the tiny preset's net, a class-conditional one, and one with convolutions for resampling
# and the timestep embedding added instead of scale-shift
NETS = {"tiny": {}, "class_conditional": {"num_classes": 3},
        "conv_resample_additive_embedding": {"resblock_updown": False, "scale_shift_norm": False,
                                             "channel_mult": (1, 2, 2), "num_groups": 32}}


@pytest.mark.parametrize("net", list(NETS.values()), ids=list(NETS))
def test_numpy_velocity_equals_flax(net):
    config = tiny(**net)
    params = random_unet_params(config.net, SHAPE, 1)
    _, apply_fn = build_model(config.net, SHAPE)
    reference = NumpyUNet(config.net, params)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.0, 1.0, (3,) + SHAPE).astype(np.float32)
    t = np.array([0.0, 0.37, 1.0], np.float32)
    labels = [None] + ([np.array([0, 2, 1], np.int32)] if config.net.num_classes else [])
    outputs = []
    for y in labels:  # y=None: the learned "no label" class
        v_jax = np.asarray(apply_fn(params, x, t, y))
        v_ref = reference(x, t, y)
        assert np.abs(v_ref).max() > 0.1
        np.testing.assert_allclose(v_jax, v_ref, rtol=0, atol=1e-4 * np.abs(v_ref).max())
        outputs.append(v_ref)
    if len(outputs) == 2:  # the labels matter
        assert np.abs(outputs[0] - outputs[1]).max() > 0.1 * np.abs(outputs[0]).max()


def test_mixed_label_maps_equal_the_definition():
    config = tiny(num_classes=2)
    score = dataclasses.replace(config.score, num_paths=3, num_times=2, aggregate="rank:2", time_weight="t2",
                                image_score="max_plus_top1", chunk_size=5, image_batch=1)
    params = random_unet_params(config.net, SHAPE, 3)
    _, apply_fn = build_model(config.net, SHAPE)
    images = np.random.default_rng(4).integers(0, 256, (3,) + SHAPE, dtype=np.uint8)
    labels = np.array([0, 1, 1], np.int32)
    maps, scores = Scorer(apply_fn, score, SHAPE).score(params, images, labels)
    velocity = unet_velocity(NumpyUNet(config.net, params))
    ref_maps, ref_scores = reference_scores(velocity, images, score, labels)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-5 * np.abs(ref_maps).max())
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    flipped, _ = reference_scores(velocity, images, score, 1 - labels)
    assert np.all(np.abs(flipped - ref_maps).max(axis=(1, 2)) > 1e-2 * np.abs(ref_maps).max(axis=(1, 2)))
