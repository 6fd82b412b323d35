"""Frozen dataclass configs for every run setting, presets, JSON round trip, overrides.

A run is fully described by one `Config`; `fmjax train` saves it as RUN/config.json.
"""
from __future__ import annotations

import dataclasses
import json
import typing


class ConfigError(ValueError):
    """A bad config field, override or preset name (one-line message)."""


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """ADM-style U-Net (guided-diffusion lineage), see fmjax/nets/unet.py."""

    base_channels: int = 64
    channel_mult: tuple = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 3
    attention_rates: tuple = (4, 8, 16, 32)  # downsampling rates with self-attention
    num_head_channels: int = 32
    dropout: float = 0.05
    scale_shift_norm: bool = True
    resblock_updown: bool = True
    num_groups: int = 32
    num_classes: int = 0  # > 0 adds a class-label embedding
    dtype: str = "float32"  # compute dtype: float32 or bfloat16


@dataclasses.dataclass(frozen=True)
class DataConfig:
    image_size: int = 64  # working resolution (square)
    channels: int = 0  # 0: from the data (grey stays grey); 1 or 3 converts
    # embedded textures (fmjax/data/textures.py)
    crop_size: int = 128  # crop side in source pixels, resized to image_size
    num_train: int = 256
    num_test: int = 60
    anomaly_fraction: float = 0.5
    holdout_fraction: float = 0.1  # normal training images kept out to fit thresholds
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    update_rms_clip: bool = True  # StableAdamW-style: clip the update's RMS to 1
    grad_clip_norm: float = 0.0  # 0 disables global-norm clipping
    ema_decay: float = 0.999
    t_sampler: str = "uniform"  # uniform | logit_normal
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # flips: None = auto, on only where the data declares orientation meaningless (textures;
    # fmjax.data.orientation_free); objects keep theirs (a flipped metal nut is a defect)
    hflip: bool | None = None
    vflip: bool | None = None
    patch_size: int = 0  # > 0: train on random square crops of this side (fully convolutional net)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Flow Mismatching scorer (METHOD.md section 1)."""

    num_paths: int = 16  # K
    num_times: int = 30  # T, interior times j / (T + 1)
    aggregate: str = "rank:2"  # min | rank:r | quantile:a | mean | median | trimmed:f
    time_weight: str = "t2"  # t2 | none
    image_score: str = "max_plus_top1"  # max_plus_top1 | max | topk_mean:f
    smooth_sigma: float = 0.0  # Gaussian smoothing of the map, in pixels; 0 = off
    chunk_size: int = 64  # network inputs per call (fixed: no recompiles); 0 = the largest that fits memory_budget_mb
    memory_budget_mb: int = 2048  # per device, for chunk_size = 0: params + stored mismatch + one call's activations
    image_batch: int = 4  # images per jitted call (padded: no recompiles)
    seed: int = 0
    use_ema: bool = True
    image_threshold_quantile: float = 0.99  # of held-out normal image scores
    pixel_threshold_quantile: float = 0.999  # of held-out normal pixel values


@dataclasses.dataclass(frozen=True)
class RadarConfig:
    """RADAR settings; every field is a choice the paper leaves open (METHOD.md section 2).
    Checked by fmjax.radar.validate_radar_config."""

    schedule: str = "linear"  # linear | cosine (Nichol & Dhariwal, s = 0.008)
    num_steps: int = 1000  # DDPM timesteps
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    t_score: int = 250  # the single noising timestep used at test time, in 0..num_steps-1
    map_kind: str = "eps_diff"  # eps_diff: eps_hat - eps | eps_hat: the prediction alone
    channel_reduce: str = "l2"  # l2: sqrt(sum_c d^2) | mean_abs: mean_c |d|
    patch_size: int = 32  # training crops and scoring patches (square)
    patch_stride: int = 16  # scoring patch stride; the last row/column is shifted to the border
    feature_local: str = "max_patch_l2"  # local feature: max over patches of the patch L2 norm
    # Isolation Forest. contamination: fraction of the (normal) training features the forest
    # places beyond its threshold, so 0.05 puts the threshold at the 5% least typical
    # training normal; "auto" uses the original Isolation Forest offset (score 0.5).
    contamination: float | str = 0.05
    n_estimators: int = 200
    max_samples: int = 0  # trees' subsample size; 0: sklearn's "auto" (min(256, N))
    forest_seed: int = 0
    noise_seed: int = 0  # fixed test-time noise: an image's score never depends on its batch
    sobel_smooth_sigma: float = 0.0  # Gaussian blur (pixels) of the noise map before Sobel; 0 = off
    image_batch: int = 4  # images per device per jitted scoring call (padded: no recompiles)
    use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Flow reconstruction baseline (METHOD.md section 3; all choices, the papers give none).
    Checked by fmjax.recon.validate_recon_config."""

    t0: float = 0.5  # start time in [0, 1): 0 = from pure noise, near 1 = barely perturbed
    steps: int = 10  # N integration steps from t0 to 1
    method: str = "euler"  # euler | heun (2 network calls per step)
    image_score: str = "max_plus_top1"  # max_plus_top1 | max | topk_mean:f (as fmjax.mismatch)
    smooth_sigma: float = 0.0  # Gaussian smoothing of the map, in pixels; 0 = off
    noise_seed: int = 0  # one noise image shared by every image: scores do not depend on the batch
    image_batch: int = 4  # images per device per jitted call (padded: no recompiles)
    use_ema: bool = True


METHODS = ("flow_mismatch", "radar", "recon")


@dataclasses.dataclass(frozen=True)
class Config:
    method: str = "flow_mismatch"  # flow_mismatch | radar | recon (see METHODS)
    net: NetConfig = NetConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()  # flow_mismatch scoring; its threshold quantiles serve every method
    radar: RadarConfig = RadarConfig()  # method radar: training objective, scoring, Isolation Forest
    recon: ReconConfig = ReconConfig()  # method recon: scoring rule of a flow-matching model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return from_dict(cls, json.loads(text))

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


def from_dict(cls, values: dict):
    """Builds dataclass `cls` from a (possibly nested) dict; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"expected an object for {cls.__name__}, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown config key {name!r} in {cls.__name__} (known: {', '.join(sorted(fields))})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value)
        else:
            kwargs[name] = _coerce(value, fields[name].default, name)
    return cls(**kwargs)


def _coerce(value, default, name):
    if default is None:  # bool | None fields (auto when None)
        if value is None or isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true, false or null (auto), got {value!r}")
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def _parse_value(text: str, default, key: str, hint=None):
    """Parses an override string into the type of the field's default (for a
    `float | str` field such as radar.contamination: a number if it reads as one; for a
    `bool | None` field such as train.hflip: true, false or auto)."""
    if str in typing.get_args(hint) and float in typing.get_args(hint):
        try:
            return float(text)
        except ValueError:
            return text
    try:
        optional_bool = bool in typing.get_args(hint) and type(None) in typing.get_args(hint)
        if optional_bool and text.lower() in ("auto", "none", "null"):
            return None
        if isinstance(default, bool) or optional_bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            items = [s for s in text.strip("()[] ").split(",") if s.strip()]
            return tuple(int(s) if s.strip().lstrip("-").isdigit() else float(s) for s in items)
        return text
    except ValueError:
        expected = "true, false or auto" if optional_bool else type(default).__name__
        raise ConfigError(f"bad value {text!r} for {key} (expected {expected})") from None


def apply_overrides(config: Config, overrides) -> Config:
    """Applies ["section.field=value", ...] (or "method=NAME") to `config`."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "method":
            config = dataclasses.replace(config, method=text)
            continue
        sections = {f.name for f in dataclasses.fields(Config) if f.name != "method"}
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(sorted(sections))})")
        section = getattr(config, parts[0])
        names = {f.name for f in dataclasses.fields(section)}
        if parts[1] not in names:
            raise ConfigError(f"unknown config key {key!r} (known in {parts[0]}: {', '.join(sorted(names))})")
        hint = typing.get_type_hints(type(section))[parts[1]]
        value = _parse_value(text, getattr(section, parts[1]), key, hint)
        config = dataclasses.replace(config, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})})
    validate(config)
    return config


def validate(config: Config) -> None:
    """Raises ConfigError for settings that cannot work."""
    from fmjax import mismatch, radar, recon  # late import: they import jax

    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r} (known: {', '.join(METHODS)})")
    if config.train.t_sampler not in ("uniform", "logit_normal"):
        raise ConfigError(f"train.t_sampler must be uniform or logit_normal, got {config.train.t_sampler!r}")
    if config.train.batch_size < 1 or config.train.steps < 0:
        raise ConfigError("train.batch_size must be >= 1 and train.steps >= 0")
    mismatch.parse_aggregate(config.score.aggregate, config.score.num_paths)
    mismatch.parse_image_score(config.score.image_score)
    if config.score.time_weight not in ("t2", "none"):
        raise ConfigError(f"score.time_weight must be t2 or none, got {config.score.time_weight!r}")
    if config.score.chunk_size < 0 or config.score.image_batch < 1:
        raise ConfigError("score.chunk_size must be >= 0 (0: from score.memory_budget_mb) and score.image_batch >= 1")
    if config.score.chunk_size == 0 and config.score.memory_budget_mb < 1:
        raise ConfigError("score.memory_budget_mb must be >= 1 when score.chunk_size = 0")
    patch = config.train.patch_size
    if patch and (patch > config.data.image_size or patch % (2 ** (len(config.net.channel_mult) - 1))):
        raise ConfigError(f"train.patch_size {patch} must be <= data.image_size and divisible by "
                          f"2**{len(config.net.channel_mult) - 1}")
    if config.data.image_size % (2 ** (len(config.net.channel_mult) - 1)):
        raise ConfigError(
            f"data.image_size {config.data.image_size} must be divisible by 2**{len(config.net.channel_mult) - 1} "
            f"for net.channel_mult {config.net.channel_mult}")
    recon.validate_recon_config(config.recon)
    if config.method == "radar":
        size = config.data.image_size
        radar.validate_radar_config(config.radar, (size, size), config.net)
        if config.net.num_classes:
            raise ConfigError("method radar trains an unconditional network: set net.num_classes=0")
    else:  # the image-size checks matter only to radar runs
        radar.validate_radar_config(config.radar)


PRESETS = {
    # seconds on a CPU: for tests
    "tiny": Config(
        net=NetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_rates=(2,),
                      num_head_channels=8, dropout=0.0, num_groups=4),
        data=DataConfig(image_size=16, crop_size=32, num_train=32, num_test=8),
        train=TrainConfig(steps=20, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every=5,
                          checkpoint_every=10, ema_decay=0.9, hflip=False, vflip=False),
        score=ScoreConfig(num_paths=4, num_times=4, aggregate="rank:2", chunk_size=16, image_batch=2),
        radar=RadarConfig(patch_size=8, patch_stride=4, n_estimators=50, image_batch=2),
        recon=ReconConfig(steps=4, image_batch=2),
    ),
    # minutes on a 2-core CPU: the demo
    "small": Config(
        net=NetConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_rates=(4,),
                      num_head_channels=32, dropout=0.0, num_groups=8),
        data=DataConfig(image_size=64, crop_size=128, num_train=256, num_test=40),
        train=TrainConfig(steps=600, batch_size=32, patch_size=32, learning_rate=1e-3, warmup_steps=50,
                          log_every=50, checkpoint_every=200, ema_decay=0.995),
        score=ScoreConfig(num_paths=16, num_times=4, aggregate="rank:2", smooth_sigma=2.0, chunk_size=16,
                          image_batch=1),
        # the same smoothing as the Flow Mismatching map, so a comparison isolates the scoring rule
        recon=ReconConfig(steps=10, smooth_sigma=2.0),
    ),
    # METHOD.md section 1 (about 45.3 M parameters); meant for accelerators
    "paper": Config(
        net=NetConfig(),
        data=DataConfig(image_size=256, crop_size=256),
        train=TrainConfig(steps=100_000, batch_size=32, learning_rate=1e-4, warmup_steps=1000),
        score=ScoreConfig(num_paths=16, num_times=30, aggregate="rank:2", chunk_size=0, image_batch=1),
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]
