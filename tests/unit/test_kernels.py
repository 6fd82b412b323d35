"""Plain layers and XLA:CPU kernels (`net.kernels`): the same parameter tree, so a
checkpoint trained with one loads with the other, and the same outputs and gradients on
the same parameters. Dropout is off here: the CPU kernels' hash-based dropout draws other
masks than nn.Dropout (each is tested on its own in test_dropout.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.config import NetConfig, preset
from fmjax.nets import unet

TINY = preset("tiny").net
VARIANTS = {
    "tiny": (TINY, (16, 16, 1)),  # in training mode: the CPU attention's one-piece path
    # no scale-shift (the per-channel bias add), conv resampling, class labels, a 2x2 lowest
    # level (im2col), GroupNorm over 16 and 32 channels (both backward layouts)
    "plain_blocks": (dataclasses.replace(TINY, base_channels=16, scale_shift_norm=False, resblock_updown=False,
                                         num_classes=3, channel_mult=(1, 2, 2, 2)), (16, 16, 3)),
}


def _params(config, shape, seed=0):
    """Random parameters of `config` (noise on every leaf, so zero-initialised layers work)."""
    rng = np.random.default_rng(seed)
    abstract = unet.abstract_params(config, shape)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape).astype(np.float32)), abstract)


def test_auto_picks_cpu_kernels_on_the_cpu_backend_only():
    assert unet.kernels_for("auto", "cpu") == "cpu"
    assert unet.kernels_for("auto", "gpu") == unet.kernels_for("auto", "tpu") == "plain"
    assert unet.kernels_for("plain", "cpu") == "plain" and unet.kernels_for("cpu", "gpu") == "cpu"
    with pytest.raises(ValueError):
        unet.kernels_for("fast")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_plain_and_cpu_kernels_agree_in_parameters_outputs_and_gradients(name):
    config, shape = VARIANTS[name]
    plain, cpu = (dataclasses.replace(config, kernels=k) for k in ("plain", "cpu"))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), unet.abstract_params(plain, shape)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), unet.abstract_params(cpu, shape))
    params = _params(config, shape)
    n = 4
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (n, *shape)).astype(np.float32))
    t = jnp.linspace(0.1, 0.9, n)
    y = jnp.arange(n) % 3 if config.num_classes else None
    train = name == "tiny"

    def output_and_gradient(net):
        module = unet.UNet(net, out_channels=shape[-1])
        apply = lambda p: module.apply(p, x, t, y, train=train)
        return jax.jit(lambda p: (apply(p), jax.grad(lambda q: jnp.sum(jnp.sin(apply(q))))(p)))(params)

    (out_plain, grad_plain), (out_cpu, grad_cpu) = output_and_gradient(plain), output_and_gradient(cpu)
    np.testing.assert_allclose(out_cpu, out_plain, rtol=2e-4, atol=2e-5 * float(jnp.abs(out_plain).max()))
    for g, w in zip(jax.tree.leaves(grad_cpu), jax.tree.leaves(grad_plain)):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * float(jnp.abs(w).max()) + 1e-7)


def test_a_checkpoint_of_one_kernel_set_loads_with_the_other(tmp_path):
    from fmjax.training.checkpoints import checkpoint_manager, restore_state, save_state
    from fmjax.training.state import init_state

    config = preset("tiny").replace(net=dataclasses.replace(TINY, kernels="cpu"))
    state = init_state(config, (16, 16, 1), jax.random.PRNGKey(0))
    manager = checkpoint_manager(str(tmp_path), config)
    save_state(manager, 1, state)
    manager.wait_until_finished()
    plain = config.replace(net=dataclasses.replace(TINY, kernels="plain"))
    restored = restore_state(str(tmp_path), plain, (16, 16, 1))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    assert isinstance(NetConfig().kernels, str) and NetConfig().kernels == "auto"
