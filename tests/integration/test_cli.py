"""The command line, in process (`fmjax.app.cli.main`): train -> evaluate -> predict on a tiny
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

import numpy as np
import pytest
import tifffile
from helpers import (CATEGORY, SIZE, TEST_IDS, TRAIN_ARGS, H, W, assert_image_metrics_from_csv,
                     assert_one_line_error, assert_pixel_metrics_from_tiffs, cli, csv_scores, image_scores_csv,
                     load_test_split, metric_values, other_metrics, reference_run_scores, run_config)
from PIL import Image

from fmjax import data as data_lib
from fmjax.app.cli import main
from fmjax.eval import plots


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A run trained once through the CLI, and the images its training loop was given."""
    from fmjax.training import loop

    run = tmp_path_factory.mktemp("runs") / "widget_run"
    given, real_train = [], loop.train

    def recording_train(config, objective, images, *args, **kwargs):
        given.append(np.array(images))
        return real_train(config, objective, images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", recording_train)
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
    figures = set(plots.FIGURES) if plots.available() else set()  # with the plots extra
    assert "overview.png" in pictures and len(pictures) == 7 + len(figures) and figures <= set(pictures)

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
    code, out, err = cli(capsys, "evaluate", "--run", run_copy, *sets, "--maps-out", tmp_path / "maps")
    assert code == 0, err
    # one note that the thresholds were fitted again; the run's own metrics.json untouched
    assert [line for line in err.splitlines() if "note:" in line] == [
        line for line in err.splitlines() if line.startswith("fmjax evaluate: note: score.aggregate 'rank:2' -> 'mean'")]
    assert "fitted again on the run's 3 held-out normal images" in err
    assert not (run_copy / "metrics.json").exists()
    written = sorted(p.name for p in run_copy.glob("metrics-*.json"))
    assert len(written) == 1 and written[0].startswith(f"metrics-{CATEGORY}-") and written[0] in out
    # the scores of the overridden rule on the raw params, not the run's own
    test = load_test_split(run_copy, data_root)
    got = csv_scores(image_scores_csv(tmp_path / "maps" / CATEGORY / "image_scores.csv"), test.names)
    _, want = reference_run_scores(run_copy, test.images, overrides=overrides, ema=False)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    default = csv_scores(image_scores_csv(evaluation[1] / CATEGORY / "image_scores.csv"), test.names)
    assert np.abs(got - default).min() > 1e-2 * np.abs(default).max()
    assert_pixel_metrics_from_tiffs(tmp_path / "maps" / CATEGORY, json.loads((run_copy / written[0]).read_text()))
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


def test_scores_out_is_the_maps_score_table_alone_and_replaces_an_earlier_one(run_copy, tmp_path, capsys):
    maps, scores = tmp_path / "maps", tmp_path / "scores"
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps, "--scores-out", scores,
                       "--no-progress")
    assert code == 0, err
    table = scores / CATEGORY / "image_scores.csv"
    assert table.read_text() == (maps / CATEGORY / "image_scores.csv").read_text()
    assert_image_metrics_from_csv(image_scores_csv(table), json.loads((run_copy / "metrics.json").read_text()))
    assert not list(scores.rglob("*.tiff"))
    (scores / CATEGORY / "stale.csv").write_text("from an earlier evaluation")
    assert cli(capsys, "evaluate", "--run", run_copy, "--scores-out", scores, "--no-progress")[0] == 0
    assert table.exists() and not (scores / CATEGORY / "stale.csv").exists()
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps, "--scores-out", maps)
    assert_one_line_error(code, err)
    assert "separate folders" in err


def test_evaluate_on_a_one_class_folder_without_masks(run_copy, data_root, tmp_path, capsys):
    """test/<other class>/ without ground_truth/: image metrics from the exported scores,
    pixel metrics nan, one warning line that says so."""
    one_class = tmp_path / "one_class"
    shutil.copytree(data_root / CATEGORY, one_class / CATEGORY)
    shutil.rmtree(one_class / CATEGORY / "ground_truth")
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--data", f"folder:{one_class}", "--maps-out",
                       tmp_path / "maps", "--no-progress")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "image-level metrics only" in warned[0], err
    metrics = other_metrics(run_copy)
    assert all(np.isnan(metrics[k]) for k in ("pixel_auroc", "pixel_ap", "aupro"))
    assert_image_metrics_from_csv(image_scores_csv(tmp_path / "maps" / CATEGORY / "image_scores.csv"), metrics)


@pytest.mark.parametrize("kept, removed, nan_keys", [
    ("normal", ("ground_truth", "test/crack"), ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")),
    ("anomalous", ("test/good",), ("image_auroc", "image_ap"))])
def test_evaluate_on_one_kind_of_test_image_warns_which_metrics_are_nan(kept, removed, nan_keys, run_copy, data_root,
                                                                        tmp_path, capsys):
    one_kind = tmp_path / "one_kind"
    shutil.copytree(data_root / CATEGORY, one_kind / CATEGORY)
    for folder in removed:
        shutil.rmtree(one_kind / CATEGORY / folder)
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--data", f"folder:{one_kind}", "--maps-out",
                       tmp_path / "maps", "--no-progress")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and f"all 3 test images are {kept}" in warned[0], err
    metrics = other_metrics(run_copy)
    assert all(np.isnan(metrics[k]) for k in nan_keys)
    assert all(np.isfinite(metrics[k]) for k in {"pixel_auroc", "pixel_ap", "aupro"} - set(nan_keys))
    assert len(image_scores_csv(tmp_path / "maps" / CATEGORY / "image_scores.csv")) == 3


def test_a_warning_prints_once_per_command(monkeypatch, capsys):
    import warnings

    from fmjax.app import cli as cli_module
    from fmjax.errors import FmjaxWarning

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    cli_module._one_line_warnings("train")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for message in ("read as RGB", "read as RGB", "another"):
            warnings.warn(message, FmjaxWarning)
    assert capsys.readouterr().err.splitlines() == ["fmjax train: warning: read as RGB",
                                                    "fmjax train: warning: another"]


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
