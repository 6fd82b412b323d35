"""The user's workflow without a network: config files layered under --set, `config show`,
the held-out slice's minimum size."""
import json

import numpy as np
import pytest
from helpers import assert_one_line_error, cli

from fmjax.config import Config, ConfigError, build, preset
from fmjax.data import holdout_count


def test_config_files_layer_between_preset_and_set(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: tiny\nmethod: recon\ntrain:\n  steps: 7\nscore:\n  steps: 3\n")
    config = build(None, None, ["train.steps=9"], str(yaml_file))
    # the file's preset and method, its settings over the preset's, --set last
    assert (config.method, config.train.steps, config.score.steps) == ("recon", 9, 3)
    assert config.net == preset("tiny").net and config.score.t0 == preset("tiny", "recon").score.t0
    # an explicit preset wins over the file's
    assert build("small", None, (), str(yaml_file)).data == preset("small").data
    # a whole config.json gives that config back, whatever the preset asked
    full = build("tiny", "radar", ["score.t_score=250", "data.channels=3"])
    json_file = tmp_path / "config.json"
    json_file.write_text(full.to_json())
    assert build(None, None, (), str(json_file)) == full
    assert build("paper", None, (), str(json_file)) == full


@pytest.mark.parametrize("text,name", [("train: [1, 2]", "c.yaml"), ("{", "c.json"), ("[1]", "c.json"),
                                       ('{"train": {"nope": 1}}', "c.json"), ('{"method": "nope"}', "c.json")])
def test_bad_config_files_are_config_errors(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError):
        build(None, None, (), str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        build(None, None, (), str(tmp_path / "missing.json"))


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"steps": 5}}')
    code, out, err = cli(capsys, "config", "show", "--preset", "tiny", "--config", path, "--set", "score.num_paths=8")
    assert code == 0, err
    shown = Config.from_dict(json.loads(out))
    assert shown == build("tiny", "flow_mismatch", ["train.steps=5", "score.num_paths=8"])
    code, _, err = cli(capsys, "config", "show", "--set", "train.nope=1")
    assert_one_line_error(code, err)


def test_held_out_slice_has_a_minimum():
    assert holdout_count(12, 0.25, 20) == 3  # fewer than 40 images: the fraction alone
    assert holdout_count(32, 0.1, 20) == 12  # all but 20
    assert holdout_count(100, 0.1, 20) == 20  # 20 of them
    assert holdout_count(256, 0.1, 20) == 26  # the fraction when it gives more
    assert holdout_count(100, 0.0, 20) == 0 and holdout_count(100, 0.1, 0) == 10
    assert holdout_count(12, 0.1, 20) == 2 and holdout_count(8, 0.1, 20) == 2  # two from 8 images on
    assert holdout_count(7, 0.1, 20) == 1 and holdout_count(4, 0.1, 20) == 0
    assert holdout_count(12, 0.1, 0) == 1  # a config without a minimum keeps its split


def test_a_hold_out_of_grouped_images_takes_whole_groups():
    from fmjax.data import split_holdout
    from fmjax.data.base import DataError, normal_split

    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    plain = normal_split(images, [str(i) for i in range(12)])
    fit, held = split_holdout(plain, 0.25, 5)
    order = np.random.default_rng([5, 7]).permutation(12)  # ungrouped: any 3 images, as always
    assert list(held.images.ravel()) == sorted(order[:3]) and list(fit.images.ravel()) == sorted(order[3:])
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    grouped = normal_split(images, [str(i) for i in range(12)], groups=groups)
    for seed in range(6):
        fit, held = split_holdout(grouped, 0.25, seed)
        assert len(held) >= 3 and len(fit) + len(held) == 12
        assert not set(held.groups.tolist()) & set(fit.groups.tolist())
        for g in set(held.groups.tolist()):
            assert (held.groups == g).sum() == (groups == g).sum()  # whole groups only
        assert (held.images.ravel() == np.flatnonzero(np.isin(groups, held.groups))).all()
        assert len(set(held.groups.tolist())) == 2  # one group would do; two let its halves be disjoint
    with pytest.raises(DataError, match="all 3 groups"):
        split_holdout(grouped, 0.9, 0)


def test_the_halves_of_a_grouped_hold_out_share_no_group():
    from fmjax.data import split_halves
    from fmjax.data.base import normal_split

    images = np.arange(9, dtype=np.uint8).reshape(9, 1, 1, 1)
    plain = normal_split(images, [str(i) for i in range(9)])
    a, b = split_halves(plain)
    assert list(a.images.ravel()) == [0, 1, 2, 3] and list(b.images.ravel()) == [4, 5, 6, 7, 8]
    groups = np.array([3, 1, 3, 1, 3, 1, 3, 7, 7])  # interleaved, as a sorted hold-out of crops is
    a, b = split_halves(normal_split(images, [str(i) for i in range(9)], groups=groups))
    assert list(a.images.ravel()) == [0, 2, 4, 6] and list(b.images.ravel()) == [1, 3, 5, 7, 8]
    assert not set(a.groups.tolist()) & set(b.groups.tolist())
    a, b = split_halves(normal_split(images, [str(i) for i in range(9)], groups=np.array([2] * 8 + [5])))
    assert len(a) == 8 and len(b) == 1  # B keeps at least one group
    a, b = split_halves(normal_split(images, [str(i) for i in range(9)], groups=np.zeros(9, np.int32)))
    assert len(a) == 4 and len(b) == 5  # one group: cut in the middle


def test_serving_preprocessing_follows_the_command_line_reader():
    import numpy as np
    from PIL import Image

    from fmjax.errors import DataError
    from fmjax.eval.viz import resize_map
    from fmjax.serving import match_channels, prepare, resize_maps, to_uint8

    rng = np.random.default_rng(0)
    for h, w, size in [(37, 50, 16), (100, 30, 16), (20, 24, 16), (10, 12, 16), (64, 64, 64)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got, original = prepare(image[None], (size, size, 3))
        want = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        assert original == (h, w) and got.dtype == np.uint8
        assert np.abs(got[0].astype(int) - want).max() <= 1 and np.mean(got[0] != want) < 0.2, (h, w)
        heat = rng.random((size, size)).astype(np.float32)
        np.testing.assert_allclose(resize_maps(heat[None], (h, w))[0], resize_map(heat, (h, w)), atol=1e-5)
    # PIL's grey conversion and float images as the reader takes float files
    rgb = rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(match_channels(rgb, 1)[0, ..., 0], np.asarray(Image.fromarray(rgb[0]).convert("L")))
    assert match_channels(rgb[..., :1], 3).shape == (1, 5, 7, 3)
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0])), [0, 128, 255])
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 127.6, 300.0])), [0, 128, 255])
    for bad in (np.zeros((4, 4, 3)), np.zeros((1, 4, 4, 2)), np.zeros((1, 2, 4, 4, 3))):
        with pytest.raises(DataError, match=r"images must be \[N, H, W, C\]"):
            prepare(bad, (16, 16, 3))


def test_a_partial_calibration_section_keeps_the_presets_minimum(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"calibration": {"holdout_fraction": 0.2}}')
    config = build("small", "flow_mismatch", (), str(path))
    assert config.calibration.holdout_fraction == 0.2
    assert config.calibration.min_holdout == preset("small").calibration.min_holdout > 0
    whole = json.loads(preset("small").to_json())
    del whole["calibration"]["min_holdout"]  # a whole config.json written before the minimum existed
    assert Config.from_dict(whole).calibration.min_holdout == 0
