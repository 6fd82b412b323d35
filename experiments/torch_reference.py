"""PyTorch reference: fmjax's ADM U-Net written again in PyTorch, a converter from the
Flax parameters to the PyTorch module, an output parity check, and the throughput of
the same work in JAX (fmjax's own jitted code) and in PyTorch on the CPU:

  scoring   Flow Mismatching maps with K paths and T times (K*T network calls per image,
            mean over paths, t^2 time weights): fmjax's Flow Mismatching Scorer against a loop over
            chunks of `score.chunk_size` inputs under torch.inference_mode();
  training  one optimisation step (flow-matching loss, backward, AdamW, EMA) on a batch of
            the preset's batch size at full resolution (no patch crops, no flips):
            fmjax.training.step.make_step_fn against a plain torch.optim.AdamW loop.

The PyTorch module is NCHW, float32, and mirrors fmjax/nets/unet.py layer for layer:
GroupNorm (eps 1e-5, groups as `num_norm_groups`), SiLU, cos-then-sin timestep
embedding of 1000 * t, multi-head self-attention with the qkv channels laid out as
[3, heads, head_dim], nearest up-sampling and 2x2 average down-sampling. Its module
names are the Flax ones, so the converter only renames leaves and transposes kernels.
The PyTorch AdamW has no update-RMS clipping (fmjax's StableAdamW-style clip): that
step does slightly less work than fmjax's.

Command:
    python experiments/torch_reference.py [--preset small] [--image-size 64] [--paths 8]
        [--times 8] [--images 2] [--channels 3] [--repeats 2] [--num-classes N] [--json PATH]
Prints a markdown table (images/s of JAX and PyTorch and their ratio for scoring and for
training, the parity maximum absolute differences) and writes the figures as JSON.
JAX runs on the CPU with one XLA host device per core (set before jax is imported);
PyTorch uses torch.set_num_threads(os.cpu_count()) and, unless OMP_WAIT_POLICY is set,
passive OpenMP waits: with spinning waits a CPU shared with other work slows PyTorch
many-fold (on a 2-core CPU running other jobs: 1.5 s instead of 0.02 s for one forward
pass of the tiny net on 16 inputs).
Each figure is the fastest of `--repeats` calls after a first (compiling, warming) call,
the JAX and PyTorch calls alternating so background load weighs on both alike.
Needs PyTorch: `pip install -e .[bench]`.
Expected run time of the default command on a 2-core CPU: about 2.5 minutes (2 min 20 s
measured while other jobs shared the CPU; most of it is XLA compiling the train step).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fmjax.app import launch

    launch.start()  # tcmalloc for both frameworks (they share the process), one XLA device per core

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fmjax.config import Config, NetConfig, preset, validate  # noqa: E402

# ----------------------------------------------------------------------------- PyTorch U-Net


def num_norm_groups(num_groups: int, channels: int) -> int:
    """min(num_groups, channels), reduced to a divisor of `channels` (as fmjax.nets.unet)."""
    g = max(1, min(num_groups, channels))
    return g if channels % g == 0 else math.gcd(g, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (cos half, then sin half) of scaled timesteps t [N]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """kernel 3: padding 1 on both sides (also for stride 2); kernel 1: no padding."""
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


def _upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] -> [N,C,2H,2W] (each pixel repeated 2x2)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GroupNorm(nn.Module):
    """GroupNorm in float32, cast back; groups = num_norm_groups(num_groups, channels)."""

    def __init__(self, num_groups: int, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_norm_groups(num_groups, channels), channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).type(x.dtype)


class Downsample(nn.Module):
    """Strided 3x3 conv: [N,C,H,W] -> [N,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = _conv(channels, channels, 3, stride=2)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [N,C,H,W] -> [N,C,2H,2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def forward(self, x, emb=None):
        return self.conv(_upsample_nearest(x))


class ResBlock(nn.Module):
    """(x [N,in,H,W], emb [N,E]) -> [N,out,H',W']: norm-SiLU-(resample)-conv, timestep
    embedding (scale-shift or added), norm-SiLU-dropout-conv, plus the (1x1 conv) skip.
    `up` / `down` resample both paths (nearest / 2x2 average, no convs)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float = 0.0,
                 scale_shift_norm: bool = True, up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down, self.scale_shift_norm = up, down, scale_shift_norm
        self.in_norm = GroupNorm(num_groups, in_ch)
        self.in_conv = _conv(in_ch, out_ch, 3)
        self.emb_dense = nn.Linear(emb_dim, 2 * out_ch if scale_shift_norm else out_ch)
        self.out_norm = GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _conv(out_ch, out_ch, 3)
        self.skip = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.in_norm(x))
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_conv(h)
        e = self.emb_dense(F.silu(emb)).type(h.dtype)[:, :, None, None]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention [N,C,H,W] -> [N,C,H,W]: GroupNorm, 1x1 qkv (channels as
    [3, heads, head_dim]), softmax(q k^T / sqrt(head_dim)) v, 1x1 projection, residual."""

    def __init__(self, channels: int, num_head_channels: int, num_groups: int):
        super().__init__()
        self.heads = max(1, channels // num_head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} not divisible by {self.heads} heads")
        self.norm = GroupNorm(num_groups, channels)
        self.qkv = _conv(channels, 3 * channels, 1)
        self.proj = _conv(channels, channels, 1)

    def forward(self, x):
        n, c, hh, ww = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, d, hh * ww).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # [N, heads, HW, d]
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(n, c, hh, ww))


class TorchUNet(nn.Module):
    """fmjax's ADM U-Net in PyTorch: (x [N,C,H,W] in [-1,1], t [N] or scalar in [0,1],
    y int [N] or None) -> velocity [N,out_channels,H,W], float32.

    Submodules carry the Flax module names (in_conv, down_0_res_0, mid_attn, up_1_upsample,
    ...), so `flax_to_torch_state` maps parameters one to one.
    """

    def __init__(self, config: NetConfig, in_channels: int, out_channels: int):
        super().__init__()
        if config.dtype != "float32":
            raise ValueError(f"the PyTorch reference computes in float32, got net.dtype={config.dtype!r}")
        self.config = config
        base, groups = config.base_channels, config.num_groups
        temb = 4 * base
        levels = len(config.channel_mult)

        def res(name, c_in, c_out, up=False, down=False):
            self.add_module(name, ResBlock(c_in, c_out, temb, groups, config.dropout, config.scale_shift_norm,
                                           up=up, down=down))

        def attn(name, c):
            self.add_module(name, AttentionBlock(c, config.num_head_channels, groups))

        self.time_dense_0 = nn.Linear(base, temb)
        self.time_dense_1 = nn.Linear(temb, temb)
        if config.num_classes > 0:
            self.label_emb = nn.Embedding(config.num_classes + 1, temb)

        ch = int(config.channel_mult[0] * base)
        self.in_conv = _conv(in_channels, ch, 3)
        skips = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for i in range(config.num_res_blocks):
                res(f"down_{level}_res_{i}", ch, int(mult * base))
                ch = int(mult * base)
                if ds in config.attention_rates:
                    attn(f"down_{level}_attn_{i}", ch)
                skips.append(ch)
            if level != levels - 1:
                name = f"down_{level}_downsample"
                if config.resblock_updown:
                    res(name, ch, ch, down=True)
                else:
                    self.add_module(name, Downsample(ch))
                skips.append(ch)
                ds *= 2

        res("mid_res_0", ch, ch)
        attn("mid_attn", ch)
        res("mid_res_1", ch, ch)

        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                res(f"up_{level}_res_{i}", ch + skips.pop(), int(mult * base))
                ch = int(mult * base)
                if ds in config.attention_rates:
                    attn(f"up_{level}_attn_{i}", ch)
                if level and i == config.num_res_blocks:
                    name = f"up_{level}_upsample"
                    if config.resblock_updown:
                        res(name, ch, ch, up=True)
                    else:
                        self.add_module(name, Upsample(ch))
                    ds //= 2

        self.out_norm = GroupNorm(groups, ch)
        self.out_conv = _conv(ch, out_channels, 3)

    def forward(self, x, t, y=None):
        cfg = self.config
        n = x.shape[0]
        levels = len(cfg.channel_mult)
        if x.shape[2] % 2 ** (levels - 1) or x.shape[3] % 2 ** (levels - 1):
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by {2 ** (levels - 1)}")
        block = lambda name: getattr(self, name)

        t = torch.broadcast_to(torch.as_tensor(t, dtype=torch.float32, device=x.device), (n,))
        emb = timestep_embedding(1000.0 * t, cfg.base_channels)
        emb = self.time_dense_1(F.silu(self.time_dense_0(emb)))
        if cfg.num_classes > 0:
            labels = (torch.full((n,), cfg.num_classes, dtype=torch.long, device=x.device) if y is None
                      else torch.as_tensor(y, device=x.device).long())
            emb = emb + self.label_emb(labels)

        h = self.in_conv(x)
        skips = [h]
        ds = 1
        for level in range(levels):
            for i in range(cfg.num_res_blocks):
                h = block(f"down_{level}_res_{i}")(h, emb)
                if ds in cfg.attention_rates:
                    h = block(f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != levels - 1:
                h = block(f"down_{level}_downsample")(h, emb)
                skips.append(h)
                ds *= 2

        h = self.mid_res_1(self.mid_attn(self.mid_res_0(h, emb)), emb)

        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = block(f"up_{level}_res_{i}")(torch.cat([h, skips.pop()], dim=1), emb)
                if ds in cfg.attention_rates:
                    h = block(f"up_{level}_attn_{i}")(h)
                if level and i == cfg.num_res_blocks:
                    h = block(f"up_{level}_upsample")(h, emb)
                    ds //= 2

        return self.out_conv(F.silu(self.out_norm(h))).float()


# ----------------------------------------------------------------------------- Flax -> PyTorch


def flax_to_torch_state(params) -> dict:
    """Flax U-Net variables ({'params': tree} or the tree) -> TorchUNet state_dict.

    Path (..., module, leaf) becomes 'module path.weight|bias': conv kernels HWIO -> OIHW,
    dense kernels [in, out] -> [out, in], GroupNorm scale and Embed embedding -> weight.
    """
    from flax import traverse_util

    tree = params["params"] if "params" in params else params
    state = {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        value = np.asarray(leaf, np.float32)
        *modules, name = path
        if name == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            name = "weight"
        elif name in ("scale", "embedding"):
            name = "weight"
        elif name != "bias":
            raise ValueError(f"unexpected Flax parameter {'/'.join(path)}")
        state[".".join((*modules, name))] = torch.from_numpy(np.array(value, np.float32, order="C"))
    return state


def torch_unet(config: NetConfig, image_shape, params) -> TorchUNet:
    """TorchUNet for images (H, W, C) holding the Flax `params` (every tensor checked), eval mode."""
    model = TorchUNet(config, in_channels=int(image_shape[-1]), out_channels=int(image_shape[-1]))
    model.load_state_dict(flax_to_torch_state(params), strict=True)
    return model.eval()


def nchw(a) -> torch.Tensor:
    """float array [N,H,W,C] -> float32 tensor [N,C,H,W]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def torch_velocity(model: TorchUNet, x, t, y=None) -> np.ndarray:
    """x [N,H,W,C], t [N], y [N] or None (numpy) -> velocity [N,H,W,C] numpy, no grad."""
    with torch.inference_mode():
        v = model(nchw(x), torch.tensor(np.asarray(t, np.float32)),
                  None if y is None else torch.tensor(np.asarray(y)))
    return v.permute(0, 2, 3, 1).numpy()


def torch_mismatch_maps(model: TorchUNet, images_u8, noise, times, chunk_size: int, labels=None,
                        time_weight: str = "t2") -> np.ndarray:
    """Flow Mismatching maps with mean path aggregation and no smoothing, in PyTorch.

    images_u8 uint8 [B,H,W,C]; noise [K,H,W,C]; times [T]; labels int [B] or None ->
    maps float32 [B,H,W] = (1/T) sum_j w(t_j) mean_k sum_c (v(x_jk, t_j) - (y - eps_k))^2,
    x_jk = (1 - t_j) eps_k + t_j y; the B*T*K inputs in image, time, path order, in
    chunks of `chunk_size` network inputs.
    """
    y = nchw(np.asarray(images_u8, np.float32) / 127.5 - 1.0)
    eps = nchw(noise)
    tt = torch.tensor(np.asarray(times, np.float32))
    lab = None if labels is None else torch.tensor(np.asarray(labels)).long()
    num_images, num_times, num_paths = y.shape[0], tt.shape[0], eps.shape[0]
    total = num_images * num_times * num_paths
    flat = torch.arange(total)
    b_idx, t_idx, k_idx = flat // (num_times * num_paths), (flat // num_paths) % num_times, flat % num_paths
    delta = torch.empty((total,) + tuple(y.shape[2:]))
    with torch.inference_mode():
        for start in range(0, total, chunk_size):
            sl = slice(start, start + chunk_size)
            yb, eb, tb = y[b_idx[sl]], eps[k_idx[sl]], tt[t_idx[sl]]
            tb4 = tb[:, None, None, None]
            v = model((1.0 - tb4) * eb + tb4 * yb, tb, None if lab is None else lab[b_idx[sl]])
            delta[sl] = torch.sum(torch.square(v - (yb - eb)), dim=1)
        per_time = delta.reshape((num_images, num_times, num_paths) + tuple(y.shape[2:])).mean(dim=2)
        w = torch.square(tt) if time_weight == "t2" else torch.ones_like(tt)
        maps = torch.einsum("bthw,t->bhw", per_time, w) / num_times
    return maps.numpy()


# ----------------------------------------------------------------------------- measurements


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _race(fns: dict, repeats: int) -> dict:
    """{name: (seconds of the first call, fastest of `repeats` further calls)} for blocking
    zero-argument callables; the timed calls alternate between the callables, so a shared,
    noisy CPU weighs on every side alike."""
    first = {name: _seconds(fn) for name, fn in fns.items()}
    best = {name: math.inf for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            best[name] = min(best[name], _seconds(fn))
    return {name: (first[name], best[name]) for name in fns}


def bench_config(preset_name: str = "small", image_size: int = 64, channels: int = 3, num_paths: int = 8,
                 num_times: int = 8, num_classes: int | None = None) -> Config:
    """The preset with this image size, K, T, mean path aggregation, no map smoothing, and
    training at full resolution without flips (the work both sides do)."""
    config = preset(preset_name)
    net = config.net if num_classes is None else dataclasses.replace(config.net, num_classes=num_classes)
    config = config.replace(
        net=net,
        data=dataclasses.replace(config.data, image_size=image_size, channels=channels),
        score=dataclasses.replace(config.score, num_paths=num_paths, num_times=num_times, aggregate="mean",
                                  smooth_sigma=0.0),
        train=dataclasses.replace(config.train, patch_size=0, hflip=False, vflip=False))
    validate(config)
    return config


def random_params(config: Config, image_shape, seed: int = 0, scale: float = 0.02):
    """Initialised Flax U-Net variables + scale * N(0, 1) on every leaf (so the zero-initialised
    output layers give a non-trivial output)."""
    import jax

    from fmjax.nets import unet

    _, params = unet.create(config.net, tuple(image_shape), jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def velocity_parity(config: Config, image_shape, params, model: TorchUNet, num: int = 4, seed: int = 0) -> dict:
    """Max |v_jax - v_torch| on `num` random inputs x [num,H,W,C] in [-1,1], t in [0,1]
    (and labels when the net is class-conditional), with the largest |v_jax| as scale."""
    import jax

    from fmjax.nets.unet import build_model

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (num,) + tuple(image_shape)).astype(np.float32)
    t = rng.uniform(0.0, 1.0, num).astype(np.float32)
    y = rng.integers(0, config.net.num_classes, num).astype(np.int32) if config.net.num_classes else None
    _, apply_fn = build_model(config.net, image_shape)
    v_jax = np.asarray(jax.jit(apply_fn)(params, x, t, y))
    v_torch = torch_velocity(model, x, t, y)
    return {"max_abs_diff": float(np.max(np.abs(v_jax - v_torch))), "output_scale": float(np.max(np.abs(v_jax)))}


def scoring_rates(config: Config, image_shape, params, model: TorchUNet, num_images: int, repeats: int,
                  seed: int = 0) -> dict:
    """Images/s of the Flow Mismatching maps (K*T network calls per image) in JAX (fmjax's
    Scorer) and in PyTorch, on the same images and noise; max |maps_jax - maps_torch|."""
    import jax

    from fmjax.methods.flow_mismatch.scorer import Scorer
    from fmjax.nets.unet import build_model

    cfg = config.score
    _, apply_fn = build_model(config.net, image_shape)
    images = np.random.default_rng(seed).integers(0, 256, (num_images,) + tuple(image_shape), dtype=np.uint8)
    labels = (np.arange(num_images) % config.net.num_classes).astype(np.int32) if config.net.num_classes else None
    scorer = Scorer(apply_fn, cfg, image_shape)
    noise, times = np.asarray(scorer.noise), np.asarray(scorer.times)
    maps = {}

    def run_jax():
        maps["jax"] = scorer.score(params, images, labels)[0]

    def run_torch():  # after run_jax: a chunk_size of 0 is settled from the memory budget by its first call
        maps["torch"] = torch_mismatch_maps(model, images, noise, times, scorer.config.chunk_size, labels,
                                            cfg.time_weight)

    timed = _race({"jax": run_jax, "torch": run_torch}, repeats)
    return {"jax_images_per_s": num_images / timed["jax"][1], "torch_images_per_s": num_images / timed["torch"][1],
            "jax_first_call_s": timed["jax"][0], "torch_first_call_s": timed["torch"][0],
            "network_calls_per_image": cfg.num_paths * cfg.num_times, "chunk_size": scorer.config.chunk_size,
            "jax_devices": int(scorer.mesh.devices.size),
            "jax_platform": jax.devices()[0].platform,
            "maps_max_abs_diff": float(np.max(np.abs(maps["jax"] - maps["torch"]))),
            "maps_scale": float(np.max(np.abs(maps["jax"])))}


def jax_train_step(config: Config, image_shape, params, devices=None, seed: int = 0):
    """(blocking callable running one step of fmjax's jitted train step (make_step_fn over a
    `data` mesh of `devices`, default all local devices) on a batch [train.batch_size, H, W, C],
    number of devices)."""
    import jax
    import jax.numpy as jnp

    from fmjax.distributed.mesh import data_mesh, replicated as replicated_on, rows
    from fmjax.methods import registry
    from fmjax.nets import unet
    from fmjax.training.state import TrainState, make_optimizer
    from fmjax.training.step import make_step_fn

    mesh = data_mesh(devices)
    replicated, batch_sharding = replicated_on(mesh), rows(mesh)
    batch_size = config.train.batch_size
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                       opt_state=make_optimizer(config.train).init(params))
    holder = [jax.device_put(state, replicated)]
    rng = np.random.default_rng(seed)
    images = jax.device_put(rng.integers(0, 256, (batch_size,) + tuple(image_shape), dtype=np.uint8), batch_sharding)
    labels = jax.device_put(rng.integers(0, max(config.net.num_classes, 1), batch_size).astype(np.int32),
                            batch_sharding)
    run_key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    step_fn = make_step_fn(registry.get(config.method).objective(config),
                           unet.UNet(config.net, out_channels=image_shape[-1]), config, mesh)

    def step():
        holder[0], metrics = step_fn(holder[0], images, labels, run_key)
        jax.block_until_ready(metrics["loss"])

    return step, int(mesh.devices.size)


def torch_train_step(model: TorchUNet, config: Config, image_shape, seed: int = 0):
    """Blocking callable running one plain PyTorch step on a copy of `model` with a batch
    [train.batch_size, C, H, W]: flow-matching loss with uniform t, backward,
    torch.optim.AdamW, EMA of the parameters."""
    cfg = config.train
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    n = cfg.batch_size
    images = torch.randint(0, 256, (n, image_shape[-1]) + tuple(image_shape[:2]), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, config.net.num_classes, (n,), generator=gen) if config.net.num_classes else None

    def step():
        x = images.float() / 127.5 - 1.0
        t = torch.rand(n, generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        t4 = t[:, None, None, None]
        loss = F.mse_loss(model((1.0 - t4) * eps + t4 * x, t, labels), x - eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - cfg.ema_decay)
        loss.item()

    return step


def training_rates(config: Config, image_shape, params, model: TorchUNet, repeats: int, seed: int = 0) -> dict:
    """Images/s of one training step in JAX (fmjax's step) and in PyTorch, same batch size."""
    jax_step, devices = jax_train_step(config, image_shape, params, seed=seed)
    timed = _race({"jax": jax_step, "torch": torch_train_step(model, config, image_shape, seed)}, repeats)
    n = config.train.batch_size
    return {"jax_images_per_s": n / timed["jax"][1], "torch_images_per_s": n / timed["torch"][1],
            "jax_first_call_s": timed["jax"][0], "torch_first_call_s": timed["torch"][0], "jax_devices": devices}


def markdown(result: dict) -> str:
    """The result as a small markdown table plus the parity lines."""
    s, t, p = result["scoring"], result["training"], result["parity"]
    rows = [
        ("work", "JAX images/s", "PyTorch images/s", "JAX / PyTorch"),
        ("---", "---:", "---:", "---:"),
        (f"scoring (K={result['K']}, T={result['T']}: {s['network_calls_per_image']} calls/image, "
         f"{result['images']} images)",
         f"{s['jax_images_per_s']:.3g}", f"{s['torch_images_per_s']:.3g}",
         f"{s['jax_images_per_s'] / s['torch_images_per_s']:.2f}"),
        (f"training step (batch {result['batch_size']})", f"{t['jax_images_per_s']:.3g}",
         f"{t['torch_images_per_s']:.3g}", f"{t['jax_images_per_s'] / t['torch_images_per_s']:.2f}"),
    ]
    size = result["image_size"]
    lines = [f"preset {result['preset']}, {size}x{size}x{result['channels']}, "
             f"JAX {result['jax_version']} on {s['jax_devices']} {s['jax_platform']} device(s), "
             f"PyTorch {result['torch_version']} with {result['torch_threads']} thread(s)", ""]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["",
              f"parity: max |v_jax - v_torch| = {p['max_abs_diff']:.2e} (max |v_jax| = {p['output_scale']:.3g}); "
              f"max |map_jax - map_torch| = {s['maps_max_abs_diff']:.2e} (max map = {s['maps_scale']:.3g})",
              f"first calls (compile / warm-up): JAX scoring {s['jax_first_call_s']:.1f} s, "
              f"training {t['jax_first_call_s']:.1f} s; PyTorch scoring {s['torch_first_call_s']:.1f} s, "
              f"training {t['torch_first_call_s']:.1f} s; wall time {result['wall_s']:.0f} s"]
    return "\n".join(lines)


def run(preset_name: str = "small", image_size: int = 64, num_paths: int = 8, num_times: int = 8,
        num_images: int = 2, channels: int = 3, repeats: int = 2, num_classes: int | None = None,
        seed: int = 0) -> dict:
    """Parity, scoring and training figures for one setting (see the module docstring)."""
    import jax

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    config = bench_config(preset_name, image_size, channels, num_paths, num_times, num_classes)
    shape = (image_size, image_size, channels)
    params = random_params(config, shape, seed)
    model = torch_unet(config.net, shape, params)
    result = {"preset": preset_name, "image_size": image_size, "channels": channels, "K": num_paths,
              "T": num_times, "images": num_images, "batch_size": config.train.batch_size,
              "num_classes": config.net.num_classes, "repeats": repeats,
              "jax_version": jax.__version__, "torch_version": torch.__version__,
              "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "cpu_count": os.cpu_count()}
    result["parity"] = velocity_parity(config, shape, params, model, seed=seed)
    result["scoring"] = scoring_rates(config, shape, params, model, num_images, repeats, seed)
    result["training"] = training_rates(config, shape, params, model, repeats, seed)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="tiny | small | paper (default: small)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--paths", type=int, default=8, help="K (default 8)")
    p.add_argument("--times", type=int, default=8, help="T (default 8)")
    p.add_argument("--images", type=int, default=2, help="images scored (default 2)")
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the first (default 2)")
    p.add_argument("--num-classes", type=int, default=None, help="class-conditional net (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    result = run(args.preset, args.image_size, args.paths, args.times, args.images, args.channels, args.repeats,
                 args.num_classes, args.seed)
    print(markdown(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
