"""The command line, in process (`fmjax.cli.main`): train -> evaluate -> predict on a tiny
MVTec-layout tree; thresholds from held-out normals only; image scores, pixel metrics and
AUPRO recomputed independently (a numpy U-Net and Flow Mismatching by its definition,
scikit-learn, a brute-force AUPRO); reproducible scores, score-only overrides, and
one-line errors with exit code 2 and no half-written output for bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from fmjax import data as data_lib
from fmjax.cli import main
from fmjax.config import Config, apply_overrides
from fmjax.train import restore_state
from references import NumpyUNet, brute_force_aupro, reference_scores, sklearn_f1_max, unet_velocity

H, W = 20, 24  # every source image is 24 wide, 20 high
SIZE = 16
CATEGORY = "widget"
SQUARES = {"000": (3, 4), "001": (7, 12), "002": (12, 2)}  # crack id -> (top, left) of the 6x6 defect
# a quarter of the 12 training normals held out: 3 images, so their quantiles differ; a
# learning rate at which 4 steps move the params well away from their EMA
TRAIN_ARGS = ["--preset", "tiny", "--set", "train.steps=4", "--set", f"data.image_size={SIZE}",
              "--set", "data.holdout_fraction=0.25", "--set", "train.learning_rate=0.01", "--no-progress"]
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
def trained(data_root, tmp_path_factory):
    """A run trained once through the CLI, and the images its training loop was given."""
    from fmjax import train as train_lib

    run = tmp_path_factory.mktemp("runs") / "widget_run"
    given, real_train = [], train_lib.train

    def recording_train(config, images, *args, **kwargs):
        given.append(np.array(images))
        return real_train(config, images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "train", recording_train)
        code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run),
                     *TRAIN_ARGS])
    assert code == 0 and len(given) == 1
    return run, given[0]


@pytest.fixture(scope="module")
def trained_run(trained):
    """The trained run folder; tests that write into a run use a copy."""
    return trained[0]


@pytest.fixture(scope="module")
def evaluation(trained_run, tmp_path_factory):
    """`evaluate --maps-out --pictures-out` once on a copy of the run:
    (run copy, maps dir, pictures dir, metrics.json)."""
    root = tmp_path_factory.mktemp("evaluation")
    run = root / "run"
    shutil.copytree(trained_run, run)
    code = main(["evaluate", "--run", str(run), "--maps-out", str(root / "maps"), "--pictures-out",
                 str(root / "pictures")])
    assert code == 0
    return run, root / "maps", root / "pictures", json.loads((run / "metrics.json").read_text())


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


def fixture_mask(name):
    """Ground truth of test image `name` ("test/crack/001") at its original size, from the
    squares the fixture pasted (not from the mask files)."""
    _, defect, ident = name.split("/")
    mask = np.zeros((H, W), np.uint8)
    if defect != "good":
        top, left = SQUARES[ident]
        mask[top:top + 6, left:left + 6] = 1
    return mask


def assert_pixel_metrics_from_tiffs(category_dir, metrics):
    """The reported pixel metrics and AUPRO, recomputed from the written TIFF maps and the
    fixture's squares: scikit-learn for AUROC, AP and F1-max, a brute-force AUPRO."""
    names = sorted(p.relative_to(category_dir).with_suffix("").as_posix() for p in category_dir.rglob("*.tiff"))
    assert names == sorted(f"test/{defect}/{ident}" for defect, ident in TEST_IDS)
    maps = [tifffile.imread(category_dir / f"{name}.tiff") for name in names]
    masks = [fixture_mask(name) for name in names]
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert metrics["pixel_f1_max"] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-9)
    assert metrics["aupro"] == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-9)


def run_config(run_dir, overrides=()):
    return apply_overrides(Config.from_json((run_dir / "config.json").read_text()), list(overrides))


def load_test_split(run_dir, data_root):
    """The test split at the run's resolution (the reader's arrays)."""
    return data_lib.load(f"folder:{data_root}", CATEGORY, run_config(run_dir).data).test


def reference_run_scores(run_dir, images, labels=None, overrides=(), ema=True):
    """Maps [N,H,W] and image scores [N] of a trained run's network, by the definition of
    Flow Mismatching with the numpy U-Net (tests/references.py) on the restored EMA params
    (or the raw ones), the run's scoring settings with `overrides`."""
    config = run_config(run_dir, overrides)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = restore_state(str(run_dir), config, shape)
    net = NumpyUNet(config.net, jax.device_get(state.ema_params if ema else state.params))
    return reference_scores(unet_velocity(net), images, config.score, labels)


def csv_scores(rows, names):
    return np.array([rows[name][1] for name in names])


# ----------------------------------------------------------------------------- the happy path

def test_thresholds_come_from_held_out_normals_only(trained, data_root):
    run, fit_images = trained
    config = run_config(run)
    assert (config.train.steps, config.data.image_size, config.data.channels) == (4, SIZE, 3)
    assert json.loads((run / "data.json").read_text()) == {"spec": f"folder:{data_root}", "category": CATEGORY}
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()][-1] == 4
    # the held-out normals: the training normals the training loop never saw
    normals = data_lib.load(f"folder:{data_root}", CATEGORY, config.data).train.images
    seen = np.array([any(np.array_equal(image, f) for f in fit_images) for image in normals])
    held_out = normals[~seen]
    assert len(normals) == 12 and len(fit_images) == 9 and len(held_out) == 3
    assert all(any(np.array_equal(f, image) for image in normals) for f in fit_images)
    # thresholds: the stated quantiles of their scores (image 0.99, pixel 0.999)
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["num_normal_images"] == 3
    maps, scores = reference_run_scores(run, held_out)
    assert calibration["image_threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-4)
    assert calibration["pixel_threshold"] == pytest.approx(np.quantile(maps, 0.999), rel=1e-4)
    assert np.ptp(scores) > 1e-3 * scores.max()  # distinct scores: another quantile gives another threshold


def test_evaluate_then_predict(evaluation, data_root, tmp_path, capsys):
    run, maps_dir, pictures_dir, metrics = evaluation
    assert metrics["num_test_images"] == 6
    tiffs = sorted(p.relative_to(maps_dir).as_posix() for p in maps_dir.rglob("*.tiff"))
    assert tiffs == sorted(f"{CATEGORY}/test/{defect}/{name}.tiff" for defect, name in TEST_IDS)
    for rel in tiffs:
        heat = tifffile.imread(maps_dir / rel)
        assert heat.dtype == np.float32 and heat.shape == (H, W), rel
    assert_pixel_metrics_from_tiffs(maps_dir / CATEGORY, metrics)
    rows = image_scores_csv(maps_dir / CATEGORY / "image_scores.csv")
    assert sorted(f"{CATEGORY}/{image}.tiff" for image in rows) == tiffs
    image_threshold = json.loads((run / "calibration.json").read_text())["image_threshold"]
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
    code, out, err = cli(capsys, "predict", "--run", run, "--input", inputs, "--out", out_dir)
    assert code == 0, err
    with open(out_dir / "scores.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        predicted = list(reader)
    assert header == ["image", "score", "anomalous", "threshold"]
    stems = sorted(p.stem for p in inputs.iterdir())
    assert sorted(r[0] for r in predicted) == stems
    for image, score, anomalous, thr in predicted:
        defect, _, name = image.partition("_")
        assert float(score) == pytest.approx(rows[f"test/{defect}/{name}"][1], rel=1e-5)  # evaluate's score
        assert anomalous == str(int(float(score) >= image_threshold))
        assert float(thr) == pytest.approx(image_threshold)
    assert sorted(p.stem for p in (out_dir / "overlays").glob("*.png")) == stems
    assert sorted(p.stem for p in (out_dir / "maps").glob("*.tiff")) == stems
    for stem in stems:
        heat = tifffile.imread(out_dir / "maps" / f"{stem}.tiff")
        assert heat.dtype == np.float32 and heat.shape == (H, W)
        with Image.open(out_dir / "overlays" / f"{stem}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (W, H)  # the input's own size
    # predict's maps are evaluate's maps for the same images (same scorer, same noise)
    evaluate_maps = tifffile.imread(maps_dir / CATEGORY / "test" / "crack" / "000.tiff")
    np.testing.assert_allclose(tifffile.imread(out_dir / "maps" / "crack_000.tiff"), evaluate_maps,
                               rtol=1e-5, atol=1e-6)


def test_image_scores_are_the_ema_networks(evaluation, data_root):
    """evaluate scores with the EMA params: its image scores are Flow Mismatching's by its
    definition on the restored EMA params, which give other scores than the raw params."""
    run, maps_dir, _, _ = evaluation
    test = load_test_split(run, data_root)
    got = csv_scores(image_scores_csv(maps_dir / CATEGORY / "image_scores.csv"), test.names)
    _, ema_scores = reference_run_scores(run, test.images)
    _, raw_scores = reference_run_scores(run, test.images, ema=False)
    np.testing.assert_allclose(got, ema_scores, rtol=1e-4)
    # ten times the tolerance above: the raw params' scores would fail it
    assert np.all(np.abs(raw_scores - ema_scores) > 1e-3 * np.abs(ema_scores)), (raw_scores, ema_scores)


def test_evaluate_is_reproducible(evaluation, tmp_path, capsys):
    run, first_maps, _, first = evaluation
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, _, err = cli(capsys, "evaluate", "--run", copy, "--maps-out", tmp_path / "maps")
    assert code == 0, err
    assert metric_values(json.loads((copy / "metrics.json").read_text())) == metric_values(first)
    for defect, name in TEST_IDS:
        rel = os.path.join(CATEGORY, "test", defect, f"{name}.tiff")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "maps" / rel), tifffile.imread(first_maps / rel))


def test_evaluate_score_overrides(run_copy, evaluation, data_root, tmp_path, capsys):
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--set", "train.steps=3")
    assert_one_line_error(code, err)
    assert not (run_copy / "metrics.json").exists()

    overrides = ["score.aggregate=mean", "score.time_weight=none", "score.use_ema=false"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, *sets, "--maps-out", tmp_path / "maps")
    assert code == 0, err
    # the scores of the overridden rule on the raw params, not the run's own
    test = load_test_split(run_copy, data_root)
    got = csv_scores(image_scores_csv(tmp_path / "maps" / CATEGORY / "image_scores.csv"), test.names)
    _, want = reference_run_scores(run_copy, test.images, overrides=overrides, ema=False)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    default = csv_scores(image_scores_csv(evaluation[1] / CATEGORY / "image_scores.csv"), test.names)
    assert np.abs(got - default).min() > 1e-2 * np.abs(default).max()
    assert_pixel_metrics_from_tiffs(tmp_path / "maps" / CATEGORY, json.loads((run_copy / "metrics.json").read_text()))
    # the overrides apply to this evaluation only
    assert run_config(run_copy) == run_config(evaluation[0])


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
