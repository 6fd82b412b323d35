import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.nets.cpu import attention as attention_module
from fmjax.nets.cpu.attention import LOGITS_BLOCK, MAX_BLOCKS, attention, query_blocks


def _plain(q, k, v, scale):
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * scale
    return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)


def _qkv(n, length, heads, d, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [2.0 * jax.random.normal(key, (n, length, heads, d)) for key in keys]


@pytest.mark.parametrize("blocks", [1, 2, 4, 16])
def test_blocks_of_queries_give_the_plain_attention_and_its_gradients(blocks):
    q, k, v = _qkv(3, 64, 2, 8)
    scale = 1.0 / np.sqrt(8)
    np.testing.assert_allclose(attention(q, k, v, scale, blocks), _plain(q, k, v, scale), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    got = jax.grad(loss(lambda q, k, v: attention(q, k, v, scale, blocks)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: _plain(q, k, v, scale)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_default_blocks_split_large_logits_and_keep_results(monkeypatch):
    monkeypatch.setattr(attention_module, "LOGITS_BLOCK", 2 * 2 * 16 * 64)  # 4 blocks of 16 queries
    q, k, v = _qkv(2, 64, 2, 4, seed=1)
    assert attention_module.query_blocks(2, 2, 64) == 4
    lowered = jax.jit(lambda q, k, v: attention(q, k, v, 0.5)).lower(q, k, v).as_text()
    assert lowered.count("stablehlo.exponential") == 4  # one softmax per block
    np.testing.assert_allclose(jax.jit(lambda q, k, v: attention(q, k, v, 0.5))(q, k, v), _plain(q, k, v, 0.5),
                               rtol=1e-5, atol=1e-5)


def test_query_blocks_rule():
    # small logits: one piece
    assert query_blocks(2, 2, 64) == 1
    # the fewest dividing blocks whose logits fit the budget
    n, heads, length = 16, 2, 256
    blocks = query_blocks(n, heads, length)
    assert length % blocks == 0 and n * heads * (length // blocks) * length <= LOGITS_BLOCK
    assert n * heads * (length // (blocks // 2)) * length > LOGITS_BLOCK
    # never more than MAX_BLOCKS, always a divisor
    assert query_blocks(16, 4, 4096) == MAX_BLOCKS
    assert query_blocks(64, 4, 100) == 10
    assert query_blocks(64, 4, 97) == 1  # a prime length has no divisor to split on


def test_blocks_must_divide_the_queries():
    q, k, v = _qkv(1, 10, 1, 4)
    with pytest.raises(ValueError, match="3 blocks do not divide 10 queries"):
        attention(q, k, v, 1.0, blocks=3)


def test_unet_inference_in_blocks_equals_training_mode_in_one_piece(monkeypatch):
    from fmjax.config import preset
    from fmjax.nets import unet

    config = dataclasses.replace(preset("tiny").net, kernels="cpu")  # dropout 0: training differs only in blocks
    module, params = unet.create(config, (16, 16, 1), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    x, t = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 1)), jnp.linspace(0.1, 0.9, 4)
    calls = []
    real = attention_module.attention
    monkeypatch.setattr(attention_module, "attention",
                        lambda *a, **kw: calls.append(kw.get("blocks")) or real(*a, **kw))
    monkeypatch.setattr(attention_module, "LOGITS_BLOCK", 4 * 16 * 64)  # attention at 8x8: 4 blocks
    blocked = module.apply(params, x, t)
    whole = module.apply(params, x, t, train=True)
    half = len(calls) // 2
    assert half and calls == [None] * half + [1] * half
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(whole))) > 1e-3
