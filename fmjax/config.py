"""Frozen dataclass configs for every run setting, presets, JSON round trip, overrides.

A run is fully described by one `Config`; `fmjax train` saves it as RUN/config.json.
`Config.score` holds the active method's scoring settings: the registry
(`fmjax.methods.registry`) names the dataclass of each method, defined beside the
method in a pure-Python module, so this module imports no method code and no JAX.
"""
from __future__ import annotations

import dataclasses
import json
import typing

from fmjax.errors import ConfigError
from fmjax.ranges import FRACTION, INT32, PROBABILITY, SEED, Range, check_ranges
from fmjax.methods import registry

__all__ = ["AUTO", "CalibrationConfig", "Config", "ConfigError", "DataConfig", "NetConfig", "PRESETS", "RANGES",
           "TexturesConfig", "TrainConfig", "apply_overrides", "build", "from_dict", "layer", "preset",
           "read_config_file", "validate", "with_method"]


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
    kernels: str = "auto"  # auto: XLA:CPU kernels on the CPU backend, plain layers elsewhere | plain | cpu


@dataclasses.dataclass(frozen=True)
class DataConfig:
    image_size: int = 64  # working resolution (square)
    channels: int = 0  # 0: from the data (grey stays grey); 1 or 3 converts


@dataclasses.dataclass(frozen=True)
class TexturesConfig:
    """The embedded texture data's generator (fmjax/data/textures.py)."""

    crop_size: int = 128  # crop side in source pixels, resized to data.image_size
    num_train: int = 256
    num_test: int = 60
    anomaly_fraction: float = 0.5
    seed: int = 0
    defects: str = "visible"  # visible | subtle (the generator before 0.2: most blobs and grain invisible)
    # tiles: train and test crops from alternate tiles of a 3 x 3 grid, each split over the
    # whole photo; halves: train from the top half, test from the bottom (runs written
    # before the tiles; the halves differ in perspective, so their normals differ too)
    layout: str = "tiles"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    # constant: the learning rate after warm-up; cosine: from there down to
    # final_lr_fraction * learning_rate at the last step
    lr_schedule: str = "constant"
    final_lr_fraction: float = 0.1
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
    heldout_loss: bool = True  # log the held-out normals' loss at every checkpoint (heldout_loss)
    # > 0: stop once this many checkpoints in a row have not lowered that loss
    early_stop_patience: int = 0


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """What every method fits on normal training images after training."""

    holdout_fraction: float = 0.1  # normal training images kept out of training to fit thresholds
    # ... but at least min(min_holdout, N - min_holdout) of N (a 0.99 quantile of 3 scores is their
    # maximum), and at least min(min_holdout, 2) of 8 or more (fmjax.data.holdout_count)
    min_holdout: int = 20
    seed: int = 0  # which images are held out
    image_threshold_quantile: float = 0.99  # of held-out normal image scores
    pixel_threshold_quantile: float = 0.999  # of held-out normal pixel values


@dataclasses.dataclass(frozen=True)
class Config:
    method: str = "flow_mismatch"  # a name in fmjax.methods.registry.METHODS
    # the preset this config started from: sets `score` when `method` changes (provenance,
    # not a setting: two configs that differ only here are equal)
    preset: str = dataclasses.field(default="", compare=False)
    net: NetConfig = NetConfig()
    data: DataConfig = DataConfig()
    textures: TexturesConfig = TexturesConfig()
    train: TrainConfig = TrainConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    score: typing.Any = None  # the method's settings; None: its defaults for `preset`

    def __post_init__(self):
        expected = registry.settings_class(self.method)
        if self.score is None:
            object.__setattr__(self, "score", registry.settings_for(self.method, self.preset))
        elif not isinstance(self.score, expected):
            raise ConfigError(f"score settings are {type(self.score).__name__}, not {expected.__name__} "
                              f"of method {self.method!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from nested dicts (config.json); unknown keys are errors. A `textures`
        section without `defects` was written before the levels: its data are the subtle ones;
        one without `layout`, before the tiles: its crops come from the photo's halves. A whole
        config's `score` without a setting added since takes the value it was written with
        (`registry.written_before`); a partial one (a --config file) the defaults."""
        values = _upgrade(values)
        if isinstance(values, dict) and isinstance(values.get("textures"), dict):
            written = values["textures"]
            values = {**values, "textures": {"defects": "subtle", "layout": "halves", **written}}
        method = values.get("method", "flow_mismatch")
        if not isinstance(method, str):
            raise ConfigError(f"config key 'method' must be a method name, got {method!r}")
        score = values.get("score")
        rest = from_dict(cls, {k: v for k, v in values.items() if k != "score"})
        if score is None:
            return rest
        if isinstance(score, dict) and {"net", "data", "train"} <= set(values):
            score = {**registry.written_before(method), **score}
        return dataclasses.replace(rest, score=from_dict(registry.settings_class(method), score))

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


# sections of configs written before the method sections moved into `score`
_TEXTURE_KEYS = ("crop_size", "num_train", "num_test", "anomaly_fraction")
_QUANTILE_KEYS = ("image_threshold_quantile", "pixel_threshold_quantile")


def _upgrade(values):
    """A config.json of an earlier layout in this one: sections `score`, `radar`, `recon`
    with texture and hold-out settings in `data` (0.1); a `calibration` section without
    `min_holdout` in a whole config (0.2: no minimum, so its held-out normals are split
    again as trained; a partial --config file keeps the preset's minimum)."""
    if isinstance(values, dict) and isinstance(values.get("calibration"), dict) \
            and "min_holdout" not in values["calibration"] and {"net", "data", "train"} <= set(values):
        values = {**values, "calibration": {**values["calibration"], "min_holdout": 0}}
    if not isinstance(values, dict) or not {"radar", "recon"} <= set(values):
        return values
    values = dict(values)
    old_methods = {"radar": values.pop("radar"), "recon": values.pop("recon")}
    flow = dict(values.get("score") or {})
    data = dict(values.get("data") or {})
    calibration = {k: flow.pop(k) for k in _QUANTILE_KEYS if k in flow}
    textures = {k: data.pop(k) for k in _TEXTURE_KEYS if k in data}
    calibration["min_holdout"] = 0
    if "holdout_fraction" in data:
        calibration["holdout_fraction"] = data.pop("holdout_fraction")
    if "seed" in data:
        textures["seed"] = calibration["seed"] = data.pop("seed")
    score = old_methods.get(values.get("method", "flow_mismatch"), flow)
    return {**values, "data": data, "textures": textures, "calibration": calibration, "score": score}


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
    if default is None:  # bool | None fields (auto when None), and Config.score (set by the caller)
        if value is None or isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true, false or null (auto), got {value!r}")
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_value(text: str, default, key: str, hint=None):
    """Parses an override string into the type of the field's default (for a
    `float | str` field such as RADAR's score.contamination: a number if it reads as one;
    for a `bool | None` field such as train.hflip: true, false or auto)."""
    args = typing.get_args(hint)
    if str in args and (float in args or int in args):
        try:
            return float(text) if float in args else int(text)
        except ValueError:
            return text
    optional_bool = bool in args and type(None) in args
    try:
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


def with_method(config: Config, method: str) -> Config:
    """`config` for method `method`: its scoring settings become that method's for the
    config's preset (unchanged when the method is the same)."""
    if method == config.method:
        return config
    return dataclasses.replace(config, method=method, score=registry.settings_for(method, config.preset))


SECTIONS = ("net", "data", "textures", "train", "calibration", "score")


def apply_overrides(config: Config, overrides) -> Config:
    """Applies ["section.field=value", ...] (or "method=NAME") in order, then validates."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts == ["method"]:
            config = with_method(config, text.strip())
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(SECTIONS)}; or method=NAME)")
        section = getattr(config, parts[0])
        names = {f.name for f in dataclasses.fields(section)}
        if parts[1] not in names:
            where = f"score of method {config.method}" if parts[0] == "score" else parts[0]
            raise ConfigError(f"unknown config key {key!r} (known in {where}: {', '.join(sorted(names))})")
        hint = typing.get_type_hints(type(section))[parts[1]]
        value = _parse_value(text, getattr(section, parts[1]), key, hint)
        config = dataclasses.replace(config, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})})
    validate(config)
    return config


def read_config_file(path: str) -> dict:
    """The settings in a JSON or YAML file (.yaml / .yml), as nested dicts in the layout of
    config.json; any subset of its keys."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        if str(path).lower().endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # json and yaml parse errors: one line naming the file
        raise ConfigError(f"config file {path} is not valid {'YAML' if str(path).endswith(('yaml', 'yml')) else 'JSON'}"
                          f" ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold an object of sections (net, data, train, ...)")
    return values


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def layer(config: Config, values: dict) -> Config:
    """`config` with the settings in `values` (nested dicts, any subset of config.json's
    keys) put over it; a `method` there switches the scoring settings first."""
    values = _upgrade(values)
    if not isinstance(values, dict):
        raise ConfigError("config settings must be an object of sections")
    method = values.get("method", config.method)
    if not isinstance(method, str):
        raise ConfigError(f"config key 'method' must be a method name, got {method!r}")
    config = with_method(config, method)
    base = json.loads(config.to_json())
    return Config.from_dict(_merge(base, values))


def build(preset_name: str | None = "small", method: str | None = "flow_mismatch", overrides=(),
          config_file: str | None = None) -> Config:
    """The config of a preset for a method, then the settings of `config_file` (JSON or
    YAML; its `preset` and `method` are used where `preset_name` / `method` are None),
    then ["section.field=value", ...], in that order. A run's config.json given as
    `config_file` gives that run's config."""
    values = read_config_file(config_file) if config_file else {}
    preset_name = preset_name or values.get("preset") or "small"
    method = method or values.get("method") or "flow_mismatch"
    config = preset(preset_name, method)
    if values:
        config = layer(config, {**values, "method": method})
    return apply_overrides(config, overrides)



# every numeric setting of the sections above (tests/unit/test_config.py checks that each
# one is here); a method's own are in its settings module's RANGES
RANGES = {
    "net": {"base_channels": Range(1, 4096), "channel_mult": Range(1, 64), "num_res_blocks": Range(1, 64),
            "attention_rates": Range(1, 2 ** 16), "num_head_channels": Range(1, 4096), "dropout": FRACTION,
            "num_groups": Range(1, 4096), "num_classes": Range(0, 100_000)},
    "data": {"image_size": Range(1, 16384), "channels": Range(0, 3)},
    "textures": {"crop_size": Range(1, 256),  # half of a 512-pixel photo (fmjax/data/textures.py)
                 "num_train": Range(1, 1_000_000), "num_test": Range(1, 1_000_000),
                 "anomaly_fraction": PROBABILITY, "seed": SEED},
    "train": {"steps": Range(1, INT32), "batch_size": Range(1, 1 << 20),
              "learning_rate": Range(0.0, 10.0, low_open=True), "warmup_steps": Range(0, INT32),
              "final_lr_fraction": FRACTION,
              "weight_decay": Range(0.0, 10.0), "b1": FRACTION, "b2": FRACTION, "grad_clip_norm": Range(0.0, 1e12),
              "ema_decay": PROBABILITY, "logit_normal_mean": Range(-10.0, 10.0),
              "logit_normal_std": Range(0.0, 10.0, low_open=True), "patch_size": Range(0, 16384), "seed": SEED,
              "log_every": Range(1, INT32), "checkpoint_every": Range(1, INT32), "keep_checkpoints": Range(1, 10_000),
              "early_stop_patience": Range(0, 1_000_000)},
    "calibration": {"holdout_fraction": FRACTION, "min_holdout": Range(0, 1_000_000), "seed": SEED,
                    "image_threshold_quantile": PROBABILITY,
                    "pixel_threshold_quantile": PROBABILITY},
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Raises ConfigError for settings that cannot work, before anything is written: every
    numeric setting against its Range (RANGES, and the method's), then the rules that tie
    settings together."""
    for section, ranges in RANGES.items():
        check_ranges(getattr(config, section), ranges, section)
    check_ranges(config.score, registry.settings_module(config.method).RANGES, "score")
    net, data, train = config.net, config.data, config.train
    _check(net.kernels in ("auto", "plain", "cpu"), f"net.kernels must be auto, plain or cpu, got {net.kernels!r}")
    _check(net.dtype in ("float32", "bfloat16"), f"net.dtype must be float32 or bfloat16, got {net.dtype!r}")
    _check(1 <= len(net.channel_mult) <= 12, f"net.channel_mult must have 1 to 12 levels, got {net.channel_mult}")
    _check(data.channels in (0, 1, 3), f"data.channels must be 0 (from the data), 1 or 3, got {data.channels}")
    _check(train.lr_schedule in ("constant", "cosine"),
           f"train.lr_schedule must be constant or cosine, got {train.lr_schedule!r}")
    _check(train.t_sampler in ("uniform", "logit_normal"),
           f"train.t_sampler must be uniform or logit_normal, got {train.t_sampler!r}")
    factor = 2 ** (len(net.channel_mult) - 1)
    patch = train.patch_size
    _check(not patch or (patch <= data.image_size and patch % factor == 0),
           f"train.patch_size {patch} must be <= data.image_size and divisible by {factor}")
    _check(data.image_size % factor == 0,
           f"data.image_size {data.image_size} must be divisible by {factor} for net.channel_mult {net.channel_mult}")
    registry.settings_module(config.method).validate(config)


AUTO = "auto"  # not a config: chosen from the training data by fmjax.app.train.resolve_auto
_SMALL_NET = NetConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_rates=(4,),
                       num_head_channels=32, dropout=0.0, num_groups=8)
_SMALL_TEXTURES = TexturesConfig(crop_size=128, num_train=256, num_test=40)
_PATCH_TRAIN = TrainConfig(steps=600, batch_size=32, patch_size=32, learning_rate=1e-3, warmup_steps=50, log_every=50,
                           checkpoint_every=200, ema_decay=0.995)

PRESETS = {
    # seconds on a CPU: for tests
    "tiny": Config(
        preset="tiny",
        net=NetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_rates=(2,),
                      num_head_channels=8, dropout=0.0, num_groups=4),
        data=DataConfig(image_size=16),
        textures=TexturesConfig(crop_size=32, num_train=32, num_test=8),
        train=TrainConfig(steps=20, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every=5,
                          checkpoint_every=10, ema_decay=0.9, hflip=False, vflip=False, heldout_loss=False),
    ),
    # minutes on a 2-core CPU: the paper's scoring rule on patches (the default before `auto`)
    "small": Config(preset="small", net=_SMALL_NET, data=DataConfig(image_size=64), textures=_SMALL_TEXTURES,
                    train=_PATCH_TRAIN),
    # the default through `auto` (fmjax.app.train.resolve_auto) for stationary textures:
    # trained on the whole images it scores (the validation protocol preferred them to
    # 32x32 patches), twice as long as `small`
    "texture": Config(preset="texture", net=_SMALL_NET, data=DataConfig(image_size=64), textures=_SMALL_TEXTURES,
                      train=dataclasses.replace(_PATCH_TRAIN, steps=1200, checkpoint_every=400, patch_size=0)),
    # the default through `auto` for aligned images (objects, digits): the whole image at
    # its own size (auto sets data.image_size), per-pixel statistics
    "aligned": Config(
        preset="aligned",
        net=_SMALL_NET,
        data=DataConfig(image_size=32),
        textures=_SMALL_TEXTURES,
        train=TrainConfig(steps=2000, batch_size=64, learning_rate=1e-3, warmup_steps=50, log_every=50,
                          checkpoint_every=500, ema_decay=0.995, hflip=False, vflip=False),
    ),
    # docs/method.md section 1 (about 45.3 M parameters); meant for accelerators
    "paper": Config(
        preset="paper",
        net=NetConfig(),
        data=DataConfig(image_size=256),
        textures=TexturesConfig(crop_size=256),
        train=TrainConfig(steps=100_000, batch_size=32, learning_rate=1e-4, warmup_steps=1000),
    ),
}


def preset(name: str, method: str = "flow_mismatch") -> Config:
    """Preset `name` (tiny, small, texture, aligned, paper) for method `method`."""
    if name == AUTO:
        raise ConfigError("preset auto is chosen from the training data: use it with fmjax train or fmjax demo, "
                          "or name a preset (" + ", ".join(PRESETS) + ")")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return with_method(PRESETS[name], method)
