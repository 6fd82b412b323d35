"""ADM-style U-Net (the guided-diffusion `UNetModel`) in Flax Linen.

Layout follows guided-diffusion's UNetModel: a 3x3 input conv, per level
`num_res_blocks` ResBlocks (plus self-attention where the downsampling rate is in
`attention_rates`) and a down-sampling block between levels; a middle block
(ResBlock, Attention, ResBlock); a decoder with `num_res_blocks + 1` blocks per
level, each taking one skip concatenation, with an up-sampling block closing every
level but the last; and an output head GroupNorm -> SiLU -> zero-init conv3x3.

Images are NHWC. Parameters are float32; `config.dtype` sets the compute dtype
(GroupNorm statistics and the attention softmax stay in float32). The output is
float32. `config.kernels` picks the blocks (`fmjax.nets.layers`): plain Flax layers, or
the XLA:CPU ones of `fmjax.nets.cpu`; `auto` takes the CPU ones on the CPU backend only.
Both give the same parameter tree, so a checkpoint trained with one loads with the other.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.config import NetConfig
from fmjax.nets.cpu import CPU
from fmjax.nets.layers import PLAIN, Kernels, torch_init

__all__ = ["UNet", "abstract_params", "build_model", "create", "kernels_for", "param_count", "timestep_embedding"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_KERNELS = {"plain": PLAIN, "cpu": CPU}


def compute_dtype(config: NetConfig):
    try:
        return _DTYPES[config.dtype]
    except KeyError:
        raise ValueError(f"net dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}") from None


def kernels_for(kernels: str, backend: str | None = None) -> str:
    """'plain' or 'cpu' for a `net.kernels` setting: auto -> cpu on the CPU backend
    (default: JAX's default backend), plain elsewhere."""
    if kernels == "auto":
        return "cpu" if (backend or jax.default_backend()) == "cpu" else "plain"
    if kernels not in _KERNELS:
        raise ValueError(f"net kernels must be auto, plain or cpu, got {kernels!r}")
    return kernels


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [N, dim] of (already scaled) timesteps t [N], float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _conv(k: Kernels, features, kernel, dtype, name, zero=False, strides=1):
    return k.conv(features, kernel, strides=strides, zero_init=zero, dtype=dtype, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Strided 3x3 conv (conv_resample=True in the reference)."""

    channels: int
    kernels: Kernels = PLAIN
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.kernels, self.channels, 3, self.dtype, "op", strides=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (conv_resample=True in the reference)."""

    channels: int
    kernels: Kernels = PLAIN
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.kernels, self.channels, 3, self.dtype, "conv")(_upsample_nearest(x))


class ResBlock(nn.Module):
    """The reference ResBlock: norm-act-conv, timestep embedding, norm-act-dropout-zero conv, skip.

    `up`/`down` resample inside the block (nearest / 2x2 average, without convs) both
    the hidden path (between activation and first conv) and the skip path.
    """

    out_channels: int
    num_groups: int
    dropout: float = 0.0
    scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    kernels: Kernels = PLAIN
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        k = self.kernels
        in_ch = x.shape[-1]
        h = k.group_norm(self.num_groups, silu=True, name="in_norm")(x)
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avg_pool2(h), _avg_pool2(x)
        h = _conv(k, self.out_channels, 3, self.dtype, "in_conv")(h)

        emb_dim = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        e = nn.Dense(emb_dim, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_init,
                     name="emb_dense")(nn.silu(emb))
        e = e.astype(h.dtype)
        out_norm = k.group_norm(self.num_groups, silu=True, name="out_norm")
        if self.scale_shift_norm:
            h = out_norm(h, *jnp.split(e, 2, axis=-1))
        else:
            h = out_norm(k.add_per_channel(h, e))
        if self.dropout > 0:
            h = k.dropout(self.dropout, deterministic=not train)(h)
        h = _conv(k, self.out_channels, 3, self.dtype, "out_conv", zero=True)(h)

        if in_ch != self.out_channels:
            x = _conv(k, self.out_channels, 1, self.dtype, "skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: GroupNorm, qkv 1x1, multi-head attention, zero-init 1x1 proj, residual."""

    num_head_channels: int
    num_groups: int
    kernels: Kernels = PLAIN
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernels
        n, hh, ww, c = x.shape
        heads = max(1, c // self.num_head_channels)
        if c % heads:
            raise ValueError(f"attention channels {c} not divisible by {heads} heads")
        d = c // heads
        qkv = _conv(k, 3 * c, 1, self.dtype, "qkv")(k.group_norm(self.num_groups, name="norm")(x))
        qkv = qkv.reshape(n, hh * ww, 3, heads, d)
        q, key, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, inv_sqrt_d = k.scalars(q, 1.0 / math.sqrt(d))
        a = k.attention(q, key, v, inv_sqrt_d, train).reshape(n, hh, ww, c)
        return x + _conv(k, c, 1, self.dtype, "proj", zero=True)(a)


class UNet(nn.Module):
    """ADM U-Net: (x [N,H,W,C] in [-1,1], t [N] in [0,1], y [N] int or None) -> [N,H,W,out_channels] f32."""

    config: NetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        cfg = self.config
        kernels = _KERNELS[kernels_for(cfg.kernels)]
        dt = compute_dtype(cfg)
        base = cfg.base_channels
        groups = cfg.num_groups
        n = x.shape[0]
        levels = len(cfg.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by {2 ** (levels - 1)}")

        def res(ch, name, up=False, down=False):
            return ResBlock(ch, groups, cfg.dropout, cfg.scale_shift_norm, up=up, down=down, kernels=kernels, dtype=dt,
                            name=name)

        def attn(name):
            return AttentionBlock(cfg.num_head_channels, groups, kernels=kernels, dtype=dt, name=name)

        # Timestep embedding. t is continuous in [0, 1]; scaling by 1000 makes the
        # sinusoid frequencies match the reference's discrete timesteps 0..999.
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,))
        temb_dim = 4 * base
        emb = timestep_embedding(1000.0 * t, base)
        emb = nn.Dense(temb_dim, dtype=dt, param_dtype=jnp.float32, kernel_init=torch_init, name="time_dense_0")(emb)
        emb = nn.Dense(temb_dim, dtype=dt, param_dtype=jnp.float32, kernel_init=torch_init,
                       name="time_dense_1")(nn.silu(emb))
        if cfg.num_classes > 0:
            # Index num_classes is a learned "no label" class, used when y is None.
            labels = jnp.full((n,), cfg.num_classes, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
            emb = emb + nn.Embed(cfg.num_classes + 1, temb_dim, dtype=dt, param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0), name="label_emb")(labels)

        # Encoder (the reference's input_blocks).
        ch = int(cfg.channel_mult[0] * base)
        h = _conv(kernels, ch, 3, dt, "in_conv")(x.astype(dt))
        skips = [h]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                ch = int(mult * base)
                h = res(ch, f"down_{level}_res_{i}")(h, emb, train)
                if ds in cfg.attention_rates:
                    h = attn(f"down_{level}_attn_{i}")(h, train)
                skips.append(h)
            if level != levels - 1:
                if cfg.resblock_updown:
                    h = res(ch, f"down_{level}_downsample", down=True)(h, emb, train)
                else:
                    h = Downsample(ch, kernels=kernels, dtype=dt, name=f"down_{level}_downsample")(h)
                skips.append(h)
                ds *= 2

        # Middle block.
        h = res(ch, "mid_res_0")(h, emb, train)
        h = attn("mid_attn")(h, train)
        h = res(ch, "mid_res_1")(h, emb, train)

        # Decoder (the reference's output_blocks).
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                ch = int(mult * base)
                h = res(ch, f"up_{level}_res_{i}")(h, emb, train)
                if ds in cfg.attention_rates:
                    h = attn(f"up_{level}_attn_{i}")(h, train)
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        h = res(ch, f"up_{level}_upsample", up=True)(h, emb, train)
                    else:
                        h = Upsample(ch, kernels=kernels, dtype=dt, name=f"up_{level}_upsample")(h)
                    ds //= 2

        h = kernels.group_norm(groups, silu=True, name="out_norm")(h)
        h = _conv(kernels, self.out_channels, 3, dt, "out_conv", zero=True)(h)
        return h.astype(jnp.float32)


def _dummy_inputs(config: NetConfig, image_shape):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if config.num_classes > 0 else None
    return x, t, y


def create(config: NetConfig, image_shape: tuple, key):
    """Builds `UNet(config, out_channels=C)` for images (H, W, C); returns (module, params).

    `params` is the variables dict from init ({'params': ...}), ready for `module.apply`.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    module = UNet(config, out_channels=image_shape[-1])
    x, t, y = _dummy_inputs(config, image_shape)
    init = jax.jit(lambda k: module.init(k, x, t, y)).lower(key)
    # The init program runs once: skipping XLA's backend optimisations cuts its
    # compile time several-fold (the many per-parameter PRNG draws compile slowly
    # on CPU) without changing the values it produces.
    params = init.compile(compiler_options={"xla_backend_optimization_level": 0})(key)
    return module, params


def abstract_params(config: NetConfig, image_shape: tuple):
    """Parameter shapes (ShapeDtypeStructs) without allocating or computing anything."""
    module = UNet(config, out_channels=int(image_shape[-1]))
    x, t, y = _dummy_inputs(config, tuple(image_shape))
    return jax.eval_shape(lambda k: module.init(k, x, t, y), jax.random.PRNGKey(0))


def param_count(params) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def build_model(config: NetConfig, image_shape):
    """(module, apply_fn) for images (H, W, C), where apply_fn(params, x [N,H,W,C],
    t [N], y [N] or None) -> [N,H,W,C] float32 in eval mode; y is used only when
    config.num_classes > 0."""
    module = UNet(config, out_channels=int(image_shape[-1]))
    conditional = config.num_classes > 0

    def apply_fn(params, x, t, y=None):
        return module.apply(params, x, t, y if conditional else None)

    return module, apply_fn
