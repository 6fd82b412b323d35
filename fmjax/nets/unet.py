"""ADM-style U-Net (the guided-diffusion `UNetModel`) in Flax Linen.

Layout follows guided-diffusion's UNetModel: a 3x3 input conv, per level
`num_res_blocks` ResBlocks (plus self-attention where the downsampling rate is in
`attention_rates`) and a down-sampling block between levels; a middle block
(ResBlock, Attention, ResBlock); a decoder with `num_res_blocks + 1` blocks per
level, each taking one skip concatenation, with an up-sampling block closing every
level but the last; and an output head GroupNorm -> SiLU -> zero-init conv3x3.

Images are NHWC. Parameters are float32; `config.dtype` sets the compute dtype
(GroupNorm statistics and the attention softmax stay in float32). The output is
float32.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.config import NetConfig
from fmjax.nets.attention import attention
from fmjax.nets.channel_sums import spread
from fmjax.nets.dropout import Dropout
from fmjax.nets.group_norm import group_norm
from fmjax.nets.scalars import beside

__all__ = ["Conv", "UNet", "conv3x3_as_matmul", "create", "param_count", "timestep_embedding"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PyTorch's default conv/linear weight init (kaiming_uniform with a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as used by the reference implementation.
_torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_zeros = nn.initializers.zeros
# Same padding as the reference's padding=1 convs, also for stride 2 (pads both sides).
_PAD1 = ((1, 1), (1, 1))


def compute_dtype(config: NetConfig):
    try:
        return _DTYPES[config.dtype]
    except KeyError:
        raise ValueError(f"net dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}") from None


def num_norm_groups(num_groups: int, channels: int) -> int:
    """min(num_groups, channels), reduced to a divisor of `channels` if needed."""
    g = max(1, min(num_groups, channels))
    return g if channels % g == 0 else math.gcd(g, channels)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [N, dim] of (already scaled) timesteps t [N], float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class _GroupNormParams(nn.Module):
    """nn.GroupNorm's parameters: `scale` (ones) and `bias` (zeros), float32 [C]."""

    @nn.compact
    def __call__(self, channels: int):
        return (self.param("scale", nn.initializers.ones, (channels,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (channels,), jnp.float32))


class GroupNorm(nn.Module):
    """GroupNorm computed in float32 (like the reference's GroupNorm32), then an optional
    per-sample scale-shift (`emb_scale`, `emb_shift` [N, C]: h * (1 + scale) + shift) and
    SiLU, cast back: one `group_norm` call. nn.GroupNorm's parameters, under `norm`.

    The same computation in training and inference.
    """

    num_groups: int
    silu: bool = False

    @nn.compact
    def __call__(self, x, emb_scale=None, emb_shift=None):
        n, c = x.shape[0], x.shape[-1]
        weight, bias = _GroupNormParams(name="norm")(c)
        scale, shift = jnp.broadcast_to(weight, (n, c)), jnp.broadcast_to(bias, (n, c))
        if emb_scale is not None:
            factor = 1.0 + emb_scale.astype(jnp.float32)
            scale, shift = scale * factor, shift * factor + emb_shift.astype(jnp.float32)
        groups = num_norm_groups(self.num_groups, c)
        return group_norm(x.astype(jnp.float32), scale, shift, groups, self.silu).astype(x.dtype)


def conv3x3_as_matmul(x, kernel):
    """3x3 convolution, stride 1, zero padding 1, as one matmul over the 9 shifted copies
    of x (im2col): x [N,H,W,C], kernel [3,3,C,O] -> [N,H,W,O]."""
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(9 * c, kernel.shape[-1])


class Conv(nn.Module):
    """nn.Conv with square `kernel` 1 or 3 (padding 1), `strides`: the same parameters
    (`kernel` [k,k,C,O], `bias` [O], float32) and the same result.

    A 3x3 stride-1 convolution of a feature map at most 2x2 (the paper preset's lowest
    level at 64x64) runs as `conv3x3_as_matmul`: XLA:CPU lowers that convolution to a
    batch/feature-swapped one that ran at about 5 GFLOP/s, 9% of the whole forward.
    The bias is added through `spread`, so its gradient is summed in XLA:CPU's fast form.
    """

    features: int
    kernel: int
    strides: int = 1
    zero_init: bool = False
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        kernel = self.param("kernel", _zeros if self.zero_init else _torch_init, (k, k, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", _zeros, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if k == 3 and self.strides == 1 and max(x.shape[1], x.shape[2]) <= 2:
            y = conv3x3_as_matmul(x, kernel)
        else:
            pad = _PAD1 if k == 3 else ((0, 0), (0, 0))
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), pad,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + spread(jnp.broadcast_to(bias, (y.shape[0], self.features)), y.shape)


def _conv(features, kernel, dtype, name, zero=False, strides=1):
    return Conv(features, kernel, strides=strides, zero_init=zero, dtype=dtype, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Strided 3x3 conv (conv_resample=True in the reference)."""

    channels: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, self.dtype, "op", strides=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (conv_resample=True in the reference)."""

    channels: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, self.dtype, "conv")(_upsample_nearest(x))


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
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        in_ch = x.shape[-1]
        h = GroupNorm(self.num_groups, silu=True, name="in_norm")(x)
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avg_pool2(h), _avg_pool2(x)
        h = _conv(self.out_channels, 3, self.dtype, "in_conv")(h)

        emb_dim = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        e = nn.Dense(emb_dim, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_torch_init,
                     name="emb_dense")(nn.silu(emb))
        e = e.astype(h.dtype)
        out_norm = GroupNorm(self.num_groups, silu=True, name="out_norm")
        if self.scale_shift_norm:
            h = out_norm(h, *jnp.split(e, 2, axis=-1))
        else:
            h = out_norm(h + spread(e, h.shape))
        if self.dropout > 0:
            h = Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, self.dtype, "out_conv", zero=True)(h)

        if in_ch != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: GroupNorm, qkv 1x1, multi-head attention, zero-init 1x1 proj, residual."""

    num_head_channels: int
    num_groups: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, hh, ww, c = x.shape
        heads = max(1, c // self.num_head_channels)
        if c % heads:
            raise ValueError(f"attention channels {c} not divisible by {heads} heads")
        d = c // heads
        qkv = _conv(3 * c, 1, self.dtype, "qkv")(GroupNorm(self.num_groups, name="norm")(x))
        qkv = qkv.reshape(n, hh * ww, 3, heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, inv_sqrt_d = beside(q, 1.0 / math.sqrt(d))
        # blocks of queries sped up inference only: a train step ran faster in one piece
        a = attention(q, k, v, inv_sqrt_d, blocks=1 if train else None).reshape(n, hh, ww, c)
        return x + _conv(c, 1, self.dtype, "proj", zero=True)(a)


class UNet(nn.Module):
    """ADM U-Net: (x [N,H,W,C] in [-1,1], t [N] in [0,1], y [N] int or None) -> [N,H,W,out_channels] f32."""

    config: NetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        cfg = self.config
        dt = compute_dtype(cfg)
        base = cfg.base_channels
        groups = cfg.num_groups
        n = x.shape[0]
        levels = len(cfg.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by {2 ** (levels - 1)}")

        def res(ch, name, up=False, down=False):
            return ResBlock(ch, groups, cfg.dropout, cfg.scale_shift_norm, up=up, down=down, dtype=dt, name=name)

        def attn(name):
            return AttentionBlock(cfg.num_head_channels, groups, dtype=dt, name=name)

        # Timestep embedding. t is continuous in [0, 1]; scaling by 1000 makes the
        # sinusoid frequencies match the reference's discrete timesteps 0..999.
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,))
        temb_dim = 4 * base
        emb = timestep_embedding(1000.0 * t, base)
        emb = nn.Dense(temb_dim, dtype=dt, param_dtype=jnp.float32, kernel_init=_torch_init, name="time_dense_0")(emb)
        emb = nn.Dense(temb_dim, dtype=dt, param_dtype=jnp.float32, kernel_init=_torch_init,
                       name="time_dense_1")(nn.silu(emb))
        if cfg.num_classes > 0:
            # Index num_classes is a learned "no label" class, used when y is None.
            labels = jnp.full((n,), cfg.num_classes, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
            emb = emb + nn.Embed(cfg.num_classes + 1, temb_dim, dtype=dt, param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0), name="label_emb")(labels)

        # Encoder (the reference's input_blocks).
        ch = int(cfg.channel_mult[0] * base)
        h = _conv(ch, 3, dt, "in_conv")(x.astype(dt))
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
                    h = Downsample(ch, dtype=dt, name=f"down_{level}_downsample")(h)
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
                        h = Upsample(ch, dtype=dt, name=f"up_{level}_upsample")(h)
                    ds //= 2

        h = GroupNorm(groups, silu=True, name="out_norm")(h)
        h = _conv(self.out_channels, 3, dt, "out_conv", zero=True)(h)
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
