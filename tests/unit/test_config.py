"""Configs: presets per method, the JSON round trip, overrides of the active method's
`score` section, the layout of earlier config.json files, validation before any work
(every numeric setting at zero, negative, NaN, infinite and huge), and a config module
that imports no JAX."""
import dataclasses
import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT

from fmjax.config import RANGES, Config, ConfigError, apply_overrides, build, preset, validate, with_method
from fmjax.methods import registry


def test_each_method_gets_its_settings_for_the_preset():
    for name in registry.names():
        for p in ("tiny", "small", "paper"):
            config = preset(p, name)
            assert config.method == name and isinstance(config.score, registry.settings_class(name))
            assert config.score == registry.settings_module(name).PRESETS.get(p, registry.settings_class(name)())
    assert preset("tiny", "radar").score.patch_size == 8 and preset("small", "recon").score.smooth_sigma == 2.0
    # method=... switches the section to that method's settings for the config's preset
    assert apply_overrides(preset("tiny"), ["method=recon"]).score == preset("tiny", "recon").score
    assert with_method(preset("tiny"), "flow_mismatch") == preset("tiny")


def test_round_trip_and_score_overrides_per_method():
    config = build("tiny", "radar", ["score.t_score=250", "score.contamination=auto"])
    assert (config.score.t_score, config.score.contamination) == (250, "auto")
    assert Config.from_json(config.to_json()) == config
    config = apply_overrides(config, ["score.contamination=0.1"])
    assert config.score.contamination == 0.1 and Config.from_json(config.to_json()) == config
    recon = build("tiny", "recon", ["score.steps=3", "score.method=heun"])
    assert (recon.score.steps, recon.score.method) == (3, "heun") and Config.from_json(recon.to_json()) == recon
    flow = build("tiny", "flow_mismatch", ["score.num_paths=32", "calibration.image_threshold_quantile=0.9"])
    assert flow.score.num_paths == 32 and flow.calibration.image_threshold_quantile == 0.9
    assert Config.from_json(flow.to_json()) == flow


@pytest.mark.parametrize("bad", [
    ["method=nope"], ["score.contamination=often"], ["score.nope=1"], ["nope.x=1"], ["train"],
    ["score.chunk_size=-1"], ["score.chunk_size=0", "score.memory_budget_mb=0"], ["score.num_paths=0"],
    ["train.log_every=0"], ["train.checkpoint_every=0"], ["train.keep_checkpoints=0"], ["train.ema_decay=1.5"],
    ["net.base_channels=0"], ["net.kernels=gpu"], ["calibration.image_threshold_quantile=1.5"],
    ["calibration.holdout_fraction=-0.1"], ["calibration.pixel_threshold_quantile=nan"], ["data.channels=2"],
    ["textures.nope=1"], ["data.crop_size=32"],
])
def test_bad_overrides_are_config_errors(bad):
    with pytest.raises(ConfigError):
        apply_overrides(preset("tiny"), bad)


# Which numeric settings take zero or a negative value, stated here independently of
# fmjax.config.RANGES; every other probe below must be refused by validation.
ZERO_OK = {"net.num_classes", "net.dropout", "data.channels", "textures.anomaly_fraction", "textures.seed",
           "train.warmup_steps", "train.weight_decay", "train.b1", "train.b2", "train.grad_clip_norm",
           "train.ema_decay", "train.early_stop_patience", "train.final_lr_fraction", "train.logit_normal_mean", "train.patch_size", "train.seed",
           "calibration.holdout_fraction", "calibration.min_holdout", "calibration.seed",
           "calibration.image_threshold_quantile",
           "calibration.pixel_threshold_quantile", "flow_mismatch.smooth_sigma", "flow_mismatch.chunk_size",
           "flow_mismatch.feature_knn", "flow_mismatch.feature_grid", "flow_mismatch.feature_map",
           "flow_mismatch.seed", "radar.t_score", "radar.max_samples", "radar.forest_seed", "radar.noise_seed",
           "radar.sobel_smooth_sigma", "radar.feature_knn", "recon.t0", "recon.smooth_sigma", "recon.noise_seed"}
NEGATIVE_OK = {"train.logit_normal_mean"}


def _numeric_fields():
    """(method, section, field name, default) of every numeric setting of every section,
    the method settings included."""
    for method in registry.names():
        config = preset("tiny", method)
        sections = ["score"] if method != "flow_mismatch" else [*RANGES, "score"]
        for section in sections:
            for field in dataclasses.fields(getattr(config, section)):
                if isinstance(field.default, (int, float, tuple)) and not isinstance(field.default, bool):
                    yield method, section, field.name, field.default


def _probes(default):
    """(label, value): zero, negative, NaN, infinite and huge values of a field's type."""
    if isinstance(default, tuple):
        return [("zero", (0,)), ("negative", (-1,)), ("huge", (10 ** 30,))]
    values = [("zero", 0), ("negative", -1), ("huge", 10 ** 30), ("nan", math.nan), ("inf", math.inf),
              ("-inf", -math.inf)]
    if isinstance(default, float):
        values += [("negative", -0.5), ("huge", 1e300)]
    return values


FIELDS = list(_numeric_fields())


def test_every_numeric_setting_has_a_range():
    assert len(FIELDS) > 50
    for method, section, name, _ in FIELDS:
        ranges = registry.settings_module(method).RANGES if section == "score" else RANGES[section]
        assert name in ranges, f"{section}.{name} of {method} has no Range"


@pytest.mark.parametrize("method,section,name,default", FIELDS, ids=[f"{m}.{s}.{n}" for m, s, n, _ in FIELDS])
def test_numeric_settings_at_zero_negative_nan_inf_and_huge(method, section, name, default):
    key = f"{method if section == 'score' else section}.{name}"
    config = preset("tiny", method)
    for label, value in _probes(default):
        bad = config.replace(**{section: dataclasses.replace(getattr(config, section), **{name: value})})
        accepted = (label == "zero" and key in ZERO_OK) or (label == "negative" and key in NEGATIVE_OK)
        if accepted:
            validate(bad)
        else:
            with pytest.raises(ConfigError, match=f"{section}.{name}"):
                validate(bad)
            # the same through --set, where the value can be written
            if not isinstance(default, tuple) and isinstance(value, (int, float)):
                text = str(int(value)) if isinstance(default, int) and isinstance(value, int) else repr(value)
                with pytest.raises(ConfigError):
                    apply_overrides(config, [f"{section}.{name}={text}"])


@pytest.mark.parametrize("method,bad", [("radar", "score.patch_size=32"), ("radar", "score.t_score=1000"),
                                        ("radar", "net.num_classes=3"), ("recon", "score.t0=1.5"),
                                        ("recon", "score.method=rk4")])
def test_method_checks(method, bad):
    with pytest.raises(ConfigError):
        build("tiny", method, [bad])


def test_unknown_keys_in_json_are_errors():
    values = json.loads(preset("tiny").to_json())
    values["train"]["nope"] = 1
    with pytest.raises(ConfigError, match="nope"):
        Config.from_dict(values)
    values = json.loads(preset("tiny", "radar").to_json())
    values["score"]["num_paths"] = 4  # a flow_mismatch field in radar's section
    with pytest.raises(ConfigError, match="num_paths"):
        Config.from_dict(values)
    with pytest.raises(ConfigError, match="true, false or null"):
        Config.from_json(json.dumps({"train": {"hflip": "yes"}}))


def _earlier_layout(config: Config, method: str) -> dict:
    """config.json as releases before the method registry wrote it: every method's section
    (score, radar, recon), thresholds in score, textures and hold-out settings in data."""
    values = json.loads(config.to_json())
    flow = json.loads(preset(config.preset, "flow_mismatch").to_json())["score"]
    sections = {"radar": json.loads(preset(config.preset, "radar").to_json())["score"],
                "recon": json.loads(preset(config.preset, "recon").to_json())["score"]}
    if method != "flow_mismatch":
        sections[method] = values["score"]
    else:
        flow = values["score"]
    flow.update(image_threshold_quantile=values["calibration"]["image_threshold_quantile"],
                pixel_threshold_quantile=values["calibration"]["pixel_threshold_quantile"])
    data = {**values["data"], **{k: values["textures"][k] for k in ("crop_size", "num_train", "num_test",
                                                                   "anomaly_fraction")},
            "holdout_fraction": values["calibration"]["holdout_fraction"], "seed": values["textures"]["seed"]}
    return {"method": method, "net": values["net"], "data": data, "train": values["train"], "score": flow,
            **sections}


@pytest.mark.parametrize("method", ["flow_mismatch", "radar", "recon"])
def test_config_json_of_the_earlier_layout_still_loads(method):
    config = build("tiny", method, ["calibration.holdout_fraction=0.2"])
    old = _earlier_layout(config, method)
    old["net"].pop("kernels")  # earlier configs had no kernels setting (default: auto)
    loaded = Config.from_dict(old)
    # its held-out normals are split again as it was trained: no minimum hold-out
    assert loaded.calibration.min_holdout == 0
    assert loaded.textures.defects == "subtle"  # the texture data it was made with
    assert loaded.replace(preset=config.preset, calibration=config.calibration, textures=config.textures) == config


def test_a_radar_config_written_before_the_forest_side_settings_scores_as_it_was_written():
    values = json.loads(build("", "radar").to_json())
    assert values["score"]["one_sided"] and values["score"]["map_feature"]  # today's defaults
    for key in ("one_sided", "map_feature"):
        values["score"].pop(key)
    loaded = Config.from_dict(values)
    assert not loaded.score.one_sided and not loaded.score.map_feature
    # a partial config (a --config file) takes the defaults
    assert Config.from_dict({"method": "radar", "score": {"t_score": 250}}).score.map_feature


def test_config_imports_no_jax():
    code = ("import sys; import fmjax.config as c; c.build('tiny', 'radar'); c.build('tiny', 'recon'); "
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_flips_are_auto_by_default_and_follow_the_data():
    from fmjax.app.train import resolve_flips
    from fmjax.data import orientation_free

    assert preset("small").train.hflip is None and preset("small").train.vflip is None
    auto = apply_overrides(preset("tiny"), ["train.hflip=auto", "train.vflip=Auto"])
    assert auto.train.hflip is None and auto.train.vflip is None
    assert Config.from_json(auto.to_json()) == auto
    assert apply_overrides(auto, ["train.hflip=true"]).train.hflip is True
    with pytest.raises(ConfigError, match="true, false or auto"):
        apply_overrides(auto, ["train.vflip=sometimes"])

    assert orientation_free("textures:brick", ["brick"])
    assert orientation_free("mvtec:/data", ["carpet"]) and orientation_free("mvtec:/data", ["grid", "wood"])
    assert not orientation_free("mvtec:/data", ["metal_nut"])
    assert not orientation_free("mvtec:/data", ["carpet", "bottle"])  # --category all over both kinds
    for spec in ("fashion_mnist:0", "visa:/data", "folder:/data"):
        assert not orientation_free(spec, ["x"])

    on = resolve_flips(auto, "textures:grass", ["grass"]).train
    off = resolve_flips(auto, "mvtec:/data", ["metal_nut"]).train
    kept = resolve_flips(apply_overrides(auto, ["train.vflip=true"]), "fashion_mnist:0", ["0"]).train
    assert (on.hflip, on.vflip, off.hflip, off.vflip, kept.hflip, kept.vflip) == (True, True, False, False, False, True)


def test_cost_per_method():
    image = (16, 16, 3)
    flow = build("tiny", "flow_mismatch", ["score.num_paths=3", "score.num_times=5"])
    assert registry.get("flow_mismatch").cost(flow, image) == {"network_calls_per_image": 15,
                                                               "sequential_calls_per_image": 1}
    features = apply_overrides(flow, ["score.feature_knn=5"])  # one more call: the features of the clean image
    assert registry.get("flow_mismatch").cost(features, image)["network_calls_per_image"] == 16
    assert registry.get("recon").cost(build("tiny", "recon", ["score.steps=3", "score.method=heun"]), image) == {
        "network_calls_per_image": 6, "sequential_calls_per_image": 6}
    # 16x16 image, 8x8 patches at stride 4: a 3x3 grid, one batched call
    assert registry.get("radar").cost(build("tiny", "radar"), image) == {
        "network_calls_per_image": 9, "sequential_calls_per_image": 1}
