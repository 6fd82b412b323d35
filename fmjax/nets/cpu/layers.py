"""GroupNorm and convolution modules for XLA:CPU, with the parameters and results of
`fmjax.nets.layers`' plain ones (docs/performance.md has the measurements)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.nets.cpu.channel_sums import spread
from fmjax.nets.cpu.group_norm import group_norm
from fmjax.nets import layers
from fmjax.nets.layers import PAD1, num_norm_groups

__all__ = ["Conv", "GroupNorm", "conv3x3_as_matmul"]


class _GroupNormParams(nn.Module):
    """nn.GroupNorm's parameters: `scale` (ones) and `bias` (zeros), float32 [C]."""

    @nn.compact
    def __call__(self, channels: int):
        return (self.param("scale", nn.initializers.ones, (channels,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (channels,), jnp.float32))


class GroupNorm(nn.Module):
    """`fmjax.nets.layers.GroupNorm` as one `group_norm` call (normalisation, both
    scale-shifts and the SiLU with one hand-written gradient); parameters under `norm`."""

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


class Conv(layers.Conv):
    """`fmjax.nets.layers.Conv` (same parameters, same result) for XLA:CPU: a 3x3 stride-1
    convolution of a feature map at most 2x2 runs as `conv3x3_as_matmul` (XLA:CPU lowers
    that convolution to a slow batch/feature-swapped one), and the bias is added through
    `spread`, so its gradient is summed in XLA:CPU's fast form."""

    @nn.compact
    def __call__(self, x):
        kernel, bias = self.weights(x.shape[-1])
        x = x.astype(self.dtype)
        if self.kernel == 3 and self.strides == 1 and max(x.shape[1], x.shape[2]) <= 2:
            y = conv3x3_as_matmul(x, kernel)
        else:
            pad = PAD1 if self.kernel == 3 else ((0, 0), (0, 0))
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), pad,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + spread(jnp.broadcast_to(bias, (y.shape[0], self.features)), y.shape)
