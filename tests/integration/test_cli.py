"""The command line, in process (`fmjax.app.cli.main`): train -> evaluate -> predict on a tiny
MVTec-layout tree, reproducible scores, score-only overrides, and one-line errors with exit
code 2 and no half-written output for bad input."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from helpers import (CATEGORY, METRIC_KEYS, SIZE, TEST_IDS, TRAIN_ARGS, H, W, assert_image_metrics_from_csv,
                     assert_one_line_error, cli, image_scores_csv, metric_values)

from fmjax.config import Config


# ----------------------------------------------------------------------------- the happy path

def test_train_writes_a_run(trained_run):
    for name in ("config.json", "data.json", "calibration.json", "train_log.jsonl"):
        assert (trained_run / name).is_file(), name
    assert os.listdir(trained_run / "checkpoints")
    config = Config.from_json((trained_run / "config.json").read_text())
    assert (config.train.steps, config.data.image_size, config.data.channels) == (4, SIZE, 3)
    assert json.loads((trained_run / "data.json").read_text())["category"] == CATEGORY
    calibration = json.loads((trained_run / "calibration.json").read_text())
    assert math.isfinite(calibration["image_threshold"]) and calibration["num_normal_images"] >= 1
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4


def test_evaluate_then_predict(run_copy, data_root, tmp_path, capsys):
    maps_dir, pictures_dir = tmp_path / "maps", tmp_path / "pictures"
    code, out, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps_dir, "--pictures-out", pictures_dir)
    assert code == 0, err
    assert CATEGORY in out
    metrics = json.loads((run_copy / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["num_test_images"] == 6

    tiffs = sorted(p.relative_to(maps_dir).as_posix() for p in maps_dir.rglob("*.tiff"))
    assert tiffs == sorted(f"{CATEGORY}/test/{defect}/{name}.tiff" for defect, name in TEST_IDS)
    for rel in tiffs:
        heat = tifffile.imread(maps_dir / rel)
        assert heat.dtype == np.float32 and heat.shape == (H, W), rel
        assert np.isfinite(heat).all()
    rows = image_scores_csv(maps_dir / CATEGORY / "image_scores.csv")
    assert sorted(f"{CATEGORY}/{image}.tiff" for image in rows) == tiffs
    image_threshold = json.loads((run_copy / "calibration.json").read_text())["image_threshold"]
    for image, (label, score, anomalous) in rows.items():
        assert label == int("/good/" not in image)
        assert anomalous == str(int(score >= image_threshold))
    assert_image_metrics_from_csv(rows, metrics)
    pictures = sorted(p.name for p in pictures_dir.glob("*.png"))
    assert "overview.png" in pictures and len(pictures) == 7

    # predict on a folder with 2 defect and 2 normal images
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for defect, name in [("crack", "000"), ("crack", "001"), ("good", "000"), ("good", "001")]:
        shutil.copy(data_root / CATEGORY / "test" / defect / f"{name}.png", inputs / f"{defect}_{name}.png")
    out_dir = tmp_path / "predictions"
    code, out, err = cli(capsys, "predict", "--run", run_copy, "--input", inputs, "--out", out_dir)
    assert code == 0, err
    with open(out_dir / "scores.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == ["image", "score", "anomalous", "threshold"]
    stems = sorted(p.stem for p in inputs.iterdir())
    assert sorted(r[0] for r in rows) == stems
    threshold = json.loads((run_copy / "calibration.json").read_text())["image_threshold"]
    for image, score, anomalous, thr in rows:
        assert math.isfinite(float(score))
        assert anomalous == str(int(float(score) >= threshold))
        assert float(thr) == pytest.approx(threshold)
    assert sorted(p.stem for p in (out_dir / "overlays").glob("*.png")) == stems
    assert sorted(p.stem for p in (out_dir / "maps").glob("*.tiff")) == stems
    for stem in stems:
        heat = tifffile.imread(out_dir / "maps" / f"{stem}.tiff")
        assert heat.dtype == np.float32 and heat.shape == (H, W)
        with Image.open(out_dir / "overlays" / f"{stem}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (W, H)  # the input's own size
    # predict's scores are evaluate's scores for the same images (same scorer, same noise)
    evaluate_maps = tifffile.imread(maps_dir / CATEGORY / "test" / "crack" / "000.tiff")
    np.testing.assert_allclose(tifffile.imread(out_dir / "maps" / "crack_000.tiff"), evaluate_maps,
                               rtol=1e-5, atol=1e-6)


def test_evaluate_is_reproducible(run_copy, tmp_path, capsys):
    results = []
    for i in range(2):
        code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", tmp_path / f"maps{i}")
        assert code == 0, err
        results.append(json.loads((run_copy / "metrics.json").read_text()))
    assert metric_values(results[0]) == metric_values(results[1])
    for defect, name in TEST_IDS:
        rel = os.path.join(CATEGORY, "test", defect, f"{name}.tiff")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "maps0" / rel), tifffile.imread(tmp_path / "maps1" / rel))


def test_evaluate_score_overrides(run_copy, capsys):
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--set", "train.steps=3")
    assert_one_line_error(code, err)
    assert not (run_copy / "metrics.json").exists()

    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--set", "score.num_paths=2")
    assert code == 0, err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0
    # the override applies to this evaluation only
    assert Config.from_json((run_copy / "config.json").read_text()).score.num_paths == 4


# ----------------------------------------------------------------------------- bad input

def _no_images(cat):
    for p in (cat / "train/good").iterdir():
        p.unlink()


def _small_mask(cat):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(cat / "ground_truth/crack/001_mask.png")


def _garbage_image(cat):
    (cat / "train/good/005.png").write_bytes(b"\x89PNG not really" * 8)


BAD_DATA = {"empty_train": _no_images, "mask_size": _small_mask, "unreadable": _garbage_image}


@pytest.fixture
def bad_root(data_root, tmp_path, request):
    root = tmp_path / "bad_data"
    shutil.copytree(data_root, root)
    BAD_DATA[request.param](root / CATEGORY)
    return root


@pytest.mark.parametrize("bad_root", list(BAD_DATA), indirect=True)
def test_train_rejects_bad_data(bad_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "train", "--data", f"folder:{bad_root}", "--category", CATEGORY, "--out", out,
                       *TRAIN_ARGS)
    assert_one_line_error(code, err)
    assert not out.exists()


BAD_ARGUMENTS = {
    "unknown_key": ["--set", "train.nope=1"],
    "bad_value": ["--set", "train.steps=abc"],
    "unknown_preset": ["--preset", "huge"],
    "missing_data": [],
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_train_rejects_bad_arguments(case, data_root, tmp_path, capsys):
    data = f"folder:{tmp_path / 'nowhere' if case == 'missing_data' else data_root}"
    out = tmp_path / "out"
    code, _, err = cli(capsys, "train", "--data", data, "--category", CATEGORY, "--out", out, *TRAIN_ARGS,
                       *BAD_ARGUMENTS[case])
    assert_one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("bad_root", ["mask_size", "unreadable"], indirect=True)
def test_evaluate_rejects_bad_data(bad_root, run_copy, tmp_path, capsys):
    maps_dir = tmp_path / "maps"
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--data", f"folder:{bad_root}", "--category", CATEGORY,
                       "--maps-out", maps_dir)
    assert_one_line_error(code, err)
    assert not (run_copy / "metrics.json").exists()
    assert not maps_dir.exists()


def test_evaluate_missing_run(tmp_path, capsys):
    run, maps_dir = tmp_path / "no_run", tmp_path / "maps"
    code, _, err = cli(capsys, "evaluate", "--run", run, "--maps-out", maps_dir)
    assert_one_line_error(code, err)
    assert not run.exists() and not maps_dir.exists()


def test_predict_missing_input(run_copy, tmp_path, capsys):
    out = tmp_path / "predictions"
    code, _, err = cli(capsys, "predict", "--run", run_copy, "--input", tmp_path / "no_images", "--out", out)
    assert_one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("message", ["", "\nfirst real line\nsecond line"])
def test_error_message_is_always_one_line(message, monkeypatch, tmp_path, capsys):
    from fmjax.app import predict
    from fmjax.errors import DataError

    def fail(args):
        raise DataError(message)

    monkeypatch.setattr(predict, "main", fail)
    code, _, err = cli(capsys, "predict", "--run", tmp_path, "--input", tmp_path, "--out", tmp_path / "out")
    assert_one_line_error(code, err)
    if message:
        assert err.strip().endswith("first real line")


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "fmjax.app.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "predict"):
        assert command in result.stdout
    script = shutil.which("fmjax")
    if script:
        assert subprocess.run([script, "--help"], capture_output=True, timeout=60).returncode == 0


def test_devices_before_or_after_the_command_and_debug_tracebacks(run_copy, tmp_path, capsys):
    for argv in (["--devices", "1", "info"], ["info", "--devices", "1"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and "backend cpu" in out, err
    code, _, err = cli(capsys, "evaluate", "--run", tmp_path / "no_run")
    assert_one_line_error(code, err)
    with pytest.raises(Exception, match="does not exist"):
        cli(capsys, "evaluate", "--run", tmp_path / "no_run", "--debug")


def test_an_unwritable_output_is_one_line(run_copy, data_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = cli(capsys, "predict", "--run", run_copy, "--input", data_root / CATEGORY / "test" / "good",
                       "--out", blocker / "out")
    assert_one_line_error(code, err)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "separator", "symlink"])
def test_category_must_be_a_plain_name_inside_the_root(case, run_copy, data_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(data_root, root)
    outside = tmp_path / "outside"
    shutil.copytree(data_root / CATEGORY, outside / CATEGORY)
    (root / "link").symlink_to(outside / CATEGORY, target_is_directory=True)
    category = {"dotdot": f"../outside/{CATEGORY}", "absolute": str(root / CATEGORY),
                "separator": f"{CATEGORY}/test", "symlink": "link"}[case]
    maps = tmp_path / "maps"
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--data", f"folder:{root}", "--category", category,
                       "--maps-out", maps)
    assert_one_line_error(code, err)
    assert not maps.exists() and not (run_copy / "metrics.json").exists()
    assert sorted(p.name for p in (outside / CATEGORY / "test").iterdir()) == ["crack", "good"]
    code, _, err = cli(capsys, "train", "--data", f"folder:{root}", "--category", category, "--out",
                       tmp_path / "new_run", *TRAIN_ARGS)
    assert_one_line_error(code, err)
    assert not (tmp_path / "new_run").exists()
