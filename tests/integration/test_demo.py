"""`fmjax demo`: the default preset is chosen from the data, and a tiny demo runs end to end."""
import json
import os

import numpy as np
import pytest

from fmjax.app import demo
from tests.helpers import assert_one_line_error, cli


def test_demo_default_resolves_auto_per_texture(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_train_run(config, spec, category, run_dir, data=None, **_):
        seen.append((spec, config.preset, config.train.steps, config.train.patch_size, data[0].images.shape))
        raise SystemExit(0)

    monkeypatch.setattr(demo, "train_run", fake_train_run)
    preset_budget = ["--steps", "0", "--patch", "0", "--train-crops", "0"]
    for extra in ([], preset_budget, ["--steps", "50", "--set", "train.steps=7"]):
        with pytest.raises(SystemExit):
            cli(capsys, "demo", "--out", tmp_path / "demo", "--textures", "grass", *extra)
        assert "preset texture (alignment" in capsys.readouterr().out
    budget, full = (200, 64, 64, 1), (256, 64, 64, 1)
    # the demo's budget (400 steps on 32x32 patches of 200 crops) unless asked for the preset's (1,200 on whole
    # images, 256 crops); --set wins over the budget flags
    assert seen == [("textures:grass", "texture", 400, 32, budget), ("textures:grass", "texture", 1200, 0, full),
                    ("textures:grass", "texture", 7, 32, budget)]


def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = cli(capsys, "demo", "--out", out, "--textures", "brick", "--preset", "tiny", "--no-progress",
                            "--steps", "3", "--patch", "0", "--train-crops", "0")
    assert code == 0, err
    rows = json.load(open(out / "demo_results.json"))
    assert [r["category"] for r in rows] == ["brick"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= rows[0][key] <= 1.0
    assert rows[0]["seconds"] > 0
    assert "| brick |" in (out / "demo_results.md").read_text()
    assert os.listdir(out / "brick" / "pictures")
    assert json.load(open(out / "brick" / "config.json"))["train"]["steps"] == 3


def test_demo_rejects_an_unknown_texture(tmp_path, capsys):
    code, _, err = cli(capsys, "demo", "--out", tmp_path / "demo", "--textures", "marble")
    assert_one_line_error(code, err)
    assert "marble" in err and not (tmp_path / "demo").exists()
