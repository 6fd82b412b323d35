"""The command line, in process (`fmjax.cli.main`): train -> evaluate -> predict on a tiny
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
from sklearn.metrics import average_precision_score, roc_auc_score

from fmjax.cli import main
from fmjax.config import Config

H, W = 20, 24  # every source image is 24 wide, 20 high
SIZE = 16
CATEGORY = "widget"
SQUARES = {"000": (3, 4), "001": (7, 12), "002": (12, 2)}  # crack id -> (top, left) of the 6x6 defect
TRAIN_ARGS = ["--preset", "tiny", "--set", "train.steps=4", "--set", f"data.image_size={SIZE}", "--no-progress"]
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
TEST_IDS = [("crack", i) for i in sorted(SQUARES)] + [("good", f"{i:03d}") for i in range(3)]


# ----------------------------------------------------------------------------- fixture data

def _image(seed, square=None):
    """RGB uint8 [H, W, 3]: horizontal waves (phase varies with seed) plus noise; an optional
    bright 6x6 square at (top, left)."""
    rng = np.random.default_rng(seed)
    xx = np.arange(W)[None, :, None]
    wave = 60.0 * np.sin(xx / 4.0 + 0.3 * seed) * np.array([1.0, 0.8, 0.6])
    image = 128.0 + wave + rng.normal(0.0, 6.0, (H, W, 3))
    if square is not None:
        top, left = square
        image[top:top + 6, left:left + 6] = 255.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tree(root):
    """ROOT/widget/{train/good (12), test/good (3), test/crack (3), ground_truth/crack (3 masks)}."""
    cat = root / CATEGORY
    for i in range(12):
        _save(cat / "train/good" / f"{i:03d}.png", _image(i))
    for i in range(3):
        _save(cat / "test/good" / f"{i:03d}.png", _image(100 + i))
    for k, (name, (top, left)) in enumerate(sorted(SQUARES.items())):
        _save(cat / "test/crack" / f"{name}.png", _image(200 + k, (top, left)))
        mask = np.zeros((H, W), np.uint8)
        mask[top:top + 6, left:left + 6] = 255
        _save(cat / "ground_truth/crack" / f"{name}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """A run trained once through the CLI; tests that write into a run use a copy."""
    run = tmp_path_factory.mktemp("runs") / "widget_run"
    code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run), *TRAIN_ARGS])
    assert code == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fmjax"), err


def image_scores_csv(path):
    """Rows of an evaluate `image_scores.csv`: {image: (label, score, anomalous)}."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["image", "label", "score", "anomalous"]
        return {image: (int(label), float(score), anomalous) for image, label, score, anomalous in reader}


def assert_image_metrics_from_csv(rows, metrics):
    """The exported image scores give the reported image metrics (sklearn recomputes them)."""
    labels = np.array([label for label, _, _ in rows.values()])
    scores = np.array([score for _, score, _ in rows.values()])
    assert roc_auc_score(labels, scores) == pytest.approx(metrics["image_auroc"], abs=1e-12)
    assert average_precision_score(labels, scores) == pytest.approx(metrics["image_ap"], abs=1e-12)


def metric_values(metrics):
    return {k: metrics[k] for k in METRIC_KEYS}


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
    from fmjax import cli as cli_module
    from fmjax.data import DataError

    def fail(args):
        raise DataError(message)

    monkeypatch.setitem(cli_module.COMMANDS, "predict", fail)
    code, _, err = cli(capsys, "predict", "--run", tmp_path, "--input", tmp_path, "--out", tmp_path / "out")
    assert_one_line_error(code, err)
    if message:
        assert err.strip().endswith("first real line")


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "fmjax.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "predict"):
        assert command in result.stdout
    script = shutil.which("fmjax")
    if script:
        assert subprocess.run([script, "--help"], capture_output=True, timeout=60).returncode == 0
