"""Independent reference implementations the tests compare fmjax against: written from the
definitions (METHOD.md, the U-Net's layer list), in numpy, sharing no code with fmjax.

- `brute_force_aupro`: AUPRO with every curve point recounted from scratch.
- `delong_by_definition`: DeLong's AUROC variance from the full matrix of pair comparisons.
- `NumpyUNet`: the ADM U-Net's forward pass on the Flax parameter tree, float64 numpy.
- `reference_scores`: Flow Mismatching maps and image scores by plain loops, with the time
  grid t_j = j / (T + 1) and the K noise images drawn here from the score seed.
- `ema_reference`: the EMA with warm-up over a sequence of parameters.
- `sklearn_f1_max`: F1-max from scikit-learn's precision-recall curve.
- `random_unet_params`: noise on every U-Net parameter (no init compile).
- `AffineField`: a four-parameter stand-in network the real train steps train in seconds.
"""
import math

import jax
import numpy as np
from flax import traverse_util
from scipy import ndimage

# ----------------------------------------------------------------------------- metrics


def delong_by_definition(scores_by_method, labels):
    """Per method (rows of scores_by_method [R, N]): the AUROC from every (anomalous, normal)
    pair (1 if the anomalous image scores higher, 1/2 for a tie), and the [R, R] covariance
    of the AUROCs, DeLong 1988 eq. (4): S10 / m + S01 / n over the pairs' row and column means."""
    scores = np.atleast_2d(np.asarray(scores_by_method, np.float64))
    labels = np.asarray(labels).astype(bool)
    pair = lambda s: (s[labels][:, None] > s[~labels][None, :]) + 0.5 * (s[labels][:, None] == s[~labels][None, :])
    psi = np.stack([pair(s) for s in scores])  # [R, m, n]
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)  # [R, m], [R, n]
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.array([[np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1) for b in range(len(scores))]
                    for a in range(len(scores))])
    s01 = np.array([[np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1) for b in range(len(scores))]
                    for a in range(len(scores))])
    return psi.mean(axis=(1, 2)), s10 / m + s01 / n


def brute_force_aupro(maps, masks, fpr_limit=0.3):
    """Reference: one curve point per distinct score, every quantity recounted from scratch."""
    regions, normals = [], []
    for amap, mask in zip(maps, masks):
        amap, mask = np.asarray(amap, dtype=np.float64), np.asarray(mask)
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for r in range(1, count + 1):
            regions.append(amap[labelled == r])
        normals.append(amap[mask == 0])
    normals = np.concatenate(normals)
    all_scores = np.concatenate([np.ravel(a) for a in maps])
    points = [(0.0, 0.0)]
    for th in sorted(set(all_scores.tolist()), reverse=True):
        fpr = np.mean(normals >= th)
        pro = np.mean([np.mean(region >= th) for region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


# ----------------------------------------------------------------------------- U-Net


def _silu(x):
    return x / (1.0 + np.exp(-x))


class NumpyUNet:
    """The ADM U-Net (guided-diffusion's UNetModel layer list) in float64 numpy, reading the
    Flax parameter tree by module name.  __call__(x [N,H,W,C], t [N] in [0, 1], y int [N] or
    None) -> velocity [N,H,W,C].  Written from the architecture, not from fmjax's code."""

    def __init__(self, net_config, params):
        self.cfg = net_config
        tree = params["params"] if "params" in params else params
        self.p = {"/".join(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(dict(tree)).items()}

    # layers -------------------------------------------------------------------------------
    def conv(self, name, x, stride=1):
        kernel, bias = self.p[f"{name}/kernel"], self.p[f"{name}/bias"]
        k = kernel.shape[0]
        pad = k // 2
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        ho = (x.shape[1] + 2 * pad - k) // stride + 1
        wo = (x.shape[2] + 2 * pad - k) // stride + 1
        out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
        for i in range(k):
            for j in range(k):
                window = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                out += window @ kernel[i, j]
        return out + bias

    def dense(self, name, x):
        return x @ self.p[f"{name}/kernel"] + self.p[f"{name}/bias"]

    def group_norm(self, name, x):
        c = x.shape[-1]
        groups = max(1, min(self.cfg.num_groups, c))
        if c % groups:
            groups = math.gcd(groups, c)
        g = x.reshape(x.shape[:-1] + (groups, c // groups))
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = g.var(axis=(1, 2, 4), keepdims=True)
        normed = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
        return normed * self.p[f"{name}/norm/scale"] + self.p[f"{name}/norm/bias"]

    @staticmethod
    def upsample(x):
        return x.repeat(2, axis=1).repeat(2, axis=2)

    @staticmethod
    def downsample(x):
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    def res_block(self, name, x, emb, up=False, down=False):
        h = _silu(self.group_norm(f"{name}/in_norm", x))
        if up:
            h, x = self.upsample(h), self.upsample(x)
        elif down:
            h, x = self.downsample(h), self.downsample(x)
        h = self.conv(f"{name}/in_conv", h)
        e = self.dense(f"{name}/emb_dense", _silu(emb))[:, None, None, :]
        if self.cfg.scale_shift_norm:
            scale, shift = np.split(e, 2, axis=-1)
            h = self.group_norm(f"{name}/out_norm", h) * (1.0 + scale) + shift
        else:
            h = self.group_norm(f"{name}/out_norm", h + e)
        h = self.conv(f"{name}/out_conv", _silu(h))
        if f"{name}/skip/kernel" in self.p:
            x = self.conv(f"{name}/skip", x)
        return x + h

    def attention(self, name, x):
        n, hh, ww, c = x.shape
        heads = max(1, c // self.cfg.num_head_channels)
        d = c // heads
        qkv = self.conv(f"{name}/qkv", self.group_norm(f"{name}/norm", x)).reshape(n, hh * ww, 3, heads, d)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [N, heads, L, d]
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        a = (weights @ v).transpose(0, 2, 1, 3).reshape(n, hh, ww, c)
        return x + self.conv(f"{name}/proj", a)

    # network ------------------------------------------------------------------------------
    def __call__(self, x, t, y=None):
        cfg = self.cfg
        x = np.asarray(x, np.float64)
        n = x.shape[0]
        t = np.broadcast_to(np.asarray(t, np.float64), (n,))
        half = cfg.base_channels // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
        args = 1000.0 * t[:, None] * freqs[None]
        emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
        emb = self.dense("time_dense_1", _silu(self.dense("time_dense_0", emb)))
        if cfg.num_classes > 0:
            labels = np.full(n, cfg.num_classes) if y is None else np.asarray(y)
            emb = emb + self.p["label_emb/embedding"][labels]

        h = self.conv("in_conv", x)
        skips, ds = [h], 1
        levels = len(cfg.channel_mult)
        for level in range(levels):
            for i in range(cfg.num_res_blocks):
                h = self.res_block(f"down_{level}_res_{i}", h, emb)
                if ds in cfg.attention_rates:
                    h = self.attention(f"down_{level}_attn_{i}", h)
                skips.append(h)
            if level != levels - 1:
                name = f"down_{level}_downsample"
                h = self.res_block(name, h, emb, down=True) if cfg.resblock_updown else self.conv(f"{name}/op", h, 2)
                skips.append(h)
                ds *= 2
        h = self.res_block("mid_res_1", self.attention("mid_attn", self.res_block("mid_res_0", h, emb)), emb)
        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = self.res_block(f"up_{level}_res_{i}", np.concatenate([h, skips.pop()], axis=-1), emb)
                if ds in cfg.attention_rates:
                    h = self.attention(f"up_{level}_attn_{i}", h)
                if level and i == cfg.num_res_blocks:
                    name = f"up_{level}_upsample"
                    h = (self.res_block(name, h, emb, up=True) if cfg.resblock_updown
                         else self.conv(f"{name}/conv", self.upsample(h)))
                    ds //= 2
        return self.conv("out_conv", _silu(self.group_norm("out_norm", h)))


def random_unet_params(net_config, image_shape, seed):
    """Random U-Net parameters (no init compile): noise on every leaf, GroupNorm scales
    around 1, so zero-initialised layers are active."""
    from fmjax.nets.unet import abstract_params

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
        return jax.numpy.asarray(noise + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(fill, abstract_params(net_config, tuple(image_shape)))


# ----------------------------------------------------------------------------- scoring


def _rank(spec):
    """'min' / 'rank:r' -> 0-based position in the sorted paths; None for mean / median."""
    if spec == "min":
        return 0
    if spec.startswith("rank:"):
        return int(spec.split(":")[1]) - 1
    return None


def reference_scores(velocity, images_u8, score_config, labels=None):
    """Flow Mismatching by its definition, looping over images and times: maps float64
    [N,H,W] and image scores [N].

    velocity(x [K,H,W,C] float, t float, label int or None) -> [K,H,W,C] (the K paths of one
    image at one time).  The times are t_j = j / (T + 1); the K noise images are standard
    normal draws from PRNGKey(score.seed), shared by every image.  Rules: aggregate min /
    rank:r / mean / median, time weight t2 / none, Gaussian smoothing (scipy, reflect),
    image score max or max_plus_top1."""
    cfg = score_config
    shape = tuple(images_u8.shape[1:])
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.num_paths,) + shape), np.float64)
    times = [j / (cfg.num_times + 1) for j in range(1, cfg.num_times + 1)]
    if cfg.image_score not in ("max", "max_plus_top1"):
        raise ValueError(f"the reference has no image score {cfg.image_score!r}")
    maps, scores = [], []
    for index, image in enumerate(images_u8):
        y = image.astype(np.float64) / 127.5 - 1.0
        label = None if labels is None else int(labels[index])
        h = 0.0
        for t in times:
            v = np.asarray(velocity((1.0 - t) * noise + t * y, t, label), np.float64)
            deltas = np.sum((v - (y - noise)) ** 2, axis=-1)  # [K, H, W]
            rank = _rank(cfg.aggregate)
            if rank is not None:
                aggregated = np.sort(deltas, axis=0)[rank]
            elif cfg.aggregate in ("mean", "median"):
                aggregated = getattr(np, cfg.aggregate)(deltas, axis=0)
            else:
                raise ValueError(f"the reference has no aggregate {cfg.aggregate!r}")
            h = h + (t * t if cfg.time_weight == "t2" else 1.0) * aggregated / cfg.num_times
        if cfg.smooth_sigma:
            h = ndimage.gaussian_filter(h, cfg.smooth_sigma, mode="reflect")
        maps.append(h)
        flat = np.sort(h.ravel())[::-1]
        top = flat[:max(1, math.ceil(0.01 * flat.size))].mean()
        scores.append(flat[0] + top if cfg.image_score == "max_plus_top1" else flat[0])
    return np.stack(maps), np.array(scores)


def unet_velocity(net):
    """reference_scores' velocity from a NumpyUNet: every path of one image at time t, with
    the image's label (None: the network's own no-label input)."""
    def velocity(x, t, label):
        return net(x, np.full(len(x), t), None if label is None else np.full(len(x), label))
    return velocity


def sklearn_f1_max(scores, labels):
    """The best F1 over all thresholds, from scikit-learn's precision-recall curve."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return float(np.max(f1))


# ----------------------------------------------------------------------------- EMA


def ema_reference(initial, params_per_step, decay):
    """EMA with warm-up: e_0 = initial params; after step s (0-based) with new params p,
    e <- d_s e + (1 - d_s) p, d_s = min(decay, (1 + s) / (10 + s))."""
    ema = jax.tree.map(lambda a: np.asarray(a, np.float64), initial)
    for s, params in enumerate(params_per_step):
        d = min(decay, (1.0 + s) / (10.0 + s))
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * np.asarray(p, np.float64), ema, params)
    return ema


class AffineField:
    """A stand-in network with four scalar parameters, applied elementwise:
    v = w0 + w1 x + w2 t + w3 x t.  Has the U-Net module's `apply` signature, so the real
    train steps can train it in seconds; `init()` gives zeros."""

    names = ("w0", "w1", "w2", "w3")

    @staticmethod
    def init():
        return {name: jax.numpy.zeros((), jax.numpy.float32) for name in AffineField.names}

    @staticmethod
    def apply(params, x, t, y=None, train=False, rngs=None):
        tb = jax.numpy.reshape(t, (-1,) + (1,) * (x.ndim - 1))
        return params["w0"] + params["w1"] * x + params["w2"] * tb + params["w3"] * x * tb

    @staticmethod
    def numpy(params, x, t):
        p = {k: float(v) for k, v in params.items()}
        return p["w0"] + p["w1"] * x + p["w2"] * t + p["w3"] * x * t
