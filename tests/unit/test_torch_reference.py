"""experiments/torch_reference.py: the PyTorch U-Net holding converted Flax parameters
computes the Flax network's velocity, and its mismatch maps equal the JAX scorer's.
These check the experiment script and run where PyTorch is installed (`pip install -e
.[bench]`); the independent reference the suite always runs is the numpy U-Net of
tests/unit/test_numpy_reference.py."""
import dataclasses
import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e .[bench])")

from fmjax.methods.flow_mismatch.scorer import Scorer  # noqa: E402
from fmjax.nets.unet import build_model  # noqa: E402
from references import random_unet_params  # noqa: E402
from test_numpy_reference import NETS, SHAPE, tiny  # noqa: E402



@pytest.fixture(scope="module")
def ref():
    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)  # several spinning OpenMP threads crawl on a CPU shared with other work
    return module


def random_params(net_config, seed):
    return random_unet_params(net_config, SHAPE, seed)


@pytest.mark.parametrize("net", list(NETS.values()), ids=list(NETS))
def test_torch_velocity_equals_flax(ref, net):
    config = tiny(**net)
    params = random_params(config.net, 1)
    model = ref.torch_unet(config.net, SHAPE, params)
    _, apply_fn = build_model(config.net, SHAPE)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.0, 1.0, (3,) + SHAPE).astype(np.float32)
    t = np.array([0.0, 0.37, 1.0], np.float32)
    labels = [None] + ([np.array([0, 2, 1], np.int32)] if config.net.num_classes else [])
    for y in labels:  # y=None: the learned "no label" class
        v_jax = np.asarray(apply_fn(params, x, t, y))
        v_torch = ref.torch_velocity(model, x, t, y)
        assert np.abs(v_jax).max() > 0.1
        np.testing.assert_allclose(v_torch, v_jax, rtol=0, atol=1e-4 * max(1.0, np.abs(v_jax).max()))


def test_converter_rejects_another_architecture(ref):
    params = random_params(tiny().net, 1)
    with pytest.raises(RuntimeError):  # load_state_dict(strict=True): missing / unexpected keys
        ref.torch_unet(tiny(num_res_blocks=2).net, SHAPE, params)


def test_torch_mismatch_maps_equal_scorer(ref):
    config = ref.bench_config("tiny", image_size=SHAPE[0], channels=SHAPE[2], num_paths=3, num_times=2,
                              num_classes=2)
    params = random_params(config.net, 3)
    model = ref.torch_unet(config.net, SHAPE, params)
    _, apply_fn = build_model(config.net, SHAPE)
    images = np.random.default_rng(4).integers(0, 256, (3,) + SHAPE, dtype=np.uint8)
    labels = np.array([0, 1, 1], np.int32)
    scorer = Scorer(apply_fn, config.score, SHAPE)
    maps_jax = scorer.score(params, images, labels)[0]
    maps_torch = ref.torch_mismatch_maps(model, images, np.asarray(scorer.noise), np.asarray(scorer.times),
                                         config.score.chunk_size, labels, config.score.time_weight)
    assert maps_torch.shape == maps_jax.shape == (3,) + SHAPE[:2]
    np.testing.assert_allclose(maps_torch, maps_jax, rtol=1e-5, atol=1e-5 * np.abs(maps_jax).max())


def test_scoring_rates_with_the_chunk_from_the_memory_budget(ref):
    """A preset with score.chunk_size = 0 (the paper preset's): both sides score in the
    chunk the JAX scorer settled from the memory budget, and their maps agree."""
    config = ref.bench_config("tiny", image_size=SHAPE[0], channels=SHAPE[2], num_paths=3, num_times=2)
    config = config.replace(score=dataclasses.replace(config.score, chunk_size=0))
    params = random_params(config.net, 5)
    model = ref.torch_unet(config.net, SHAPE, params)
    rates = ref.scoring_rates(config, SHAPE, params, model, num_images=1, repeats=1)
    assert rates["chunk_size"] > 0
    assert rates["maps_max_abs_diff"] <= 1e-5 * rates["maps_scale"]
    assert rates["jax_images_per_s"] > 0 and rates["torch_images_per_s"] > 0
