"""The user's workflow without a network: config files layered under --set, `config show`,
the held-out slice's minimum size."""
import json

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
    full = build("tiny", "radar", ["score.t_score=100", "data.channels=3"])
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
