"""The U-Net's blocks written for XLA:CPU (`CPU`): GroupNorm with a hand-written gradient,
channel sums in XLA:CPU's fast form, traced scalars, hash-based dropout masks, attention
in blocks of queries, small 3x3 convolutions as one matmul. Same parameters and results
as the plain blocks of `fmjax.nets.layers` up to float32 rounding (dropout draws other
masks); used where they were measured to win (docs/performance.md)."""
from fmjax.nets.cpu import attention as _attention
from fmjax.nets.cpu import channel_sums as _channel_sums
from fmjax.nets.cpu import dropout as _dropout
from fmjax.nets.cpu import layers as _layers
from fmjax.nets.cpu import scalars as _scalars
from fmjax.nets.layers import Kernels

__all__ = ["CPU"]


def _attend(q, k, v, scale, train: bool = False):
    # blocks of queries sped up inference only: a train step ran faster in one piece
    return _attention.attention(q, k, v, scale, blocks=1 if train else None)


def _add_per_channel(h, v):
    return h + _channel_sums.spread(v, h.shape)


def _scalars_beside(v, *values):
    return _scalars.beside(v, *values)


CPU = Kernels(group_norm=_layers.GroupNorm, conv=_layers.Conv, dropout=_dropout.Dropout, attention=_attend,
              add_per_channel=_add_per_channel, scalars=_scalars_beside)
