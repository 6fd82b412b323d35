"""RADAR and flow reconstruction through the command line: train -> evaluate -> predict on
the tiny MVTec-layout tree of test_cli (thresholds from the held-out normals, pixel metrics
recomputed from the written maps, RADAR's metrics from its decisions), the stored Isolation
Forest (same labels after a restore, identical metrics on every evaluation), method configs
and a bad --method."""
import csv
import json
import math
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import tifffile
from helpers import (CATEGORY, METRIC_KEYS, SIZE, TEST_IDS, TRAIN_ARGS, H, W, assert_image_metrics_from_csv,
                     assert_one_line_error, assert_pixel_metrics_from_tiffs, cli, image_scores_csv, other_metrics,
                     run_config)
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from fmjax import data as data_lib
from fmjax import runs
from fmjax.app.cli import main
from fmjax.methods.radar import forest as forest_lib
from fmjax.methods.radar.settings import PRESETS as RADAR_PRESETS

RADAR_KEYS = ("radar_accuracy", "radar_precision", "radar_recall", "radar_f1")
METHODS = ("radar", "recon")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """{method: run folder}, each trained once through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in METHODS:
        out[method] = root / method
        code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(out[method]),
                     "--method", method, *TRAIN_ARGS])
        assert code == 0, method
    return out


def read_scores_csv(path):
    with open(path, newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def copy_inputs(data_root, dest):
    dest.mkdir()
    for defect, name in [("crack", "000"), ("crack", "001"), ("good", "000"), ("good", "001")]:
        shutil.copy(data_root / CATEGORY / "test" / defect / f"{name}.png", dest / f"{defect}_{name}.png")
    return dest


# ----------------------------------------------------------------------------- train, evaluate, predict

@pytest.mark.parametrize("method", METHODS)
def test_train_fits_thresholds_on_the_held_out_normals(trained, data_root, method):
    run = trained[method]
    assert (run / runs.CALIBRATION_ARRAYS).is_file() == (method == "radar")
    assert (run / "manifest.json").is_file()
    config = run_config(run)
    assert (config.method, config.train.steps, config.data.channels) == (method, 4, 3)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and all(math.isfinite(record["loss"]) for record in log)
    dataset = data_lib.load(f"folder:{data_root}", CATEGORY, config.data)
    _, held_out = data_lib.split_holdout(dataset.train, config.calibration.holdout_fraction, config.calibration.seed)
    maps, scores = runs.load_run(str(run)).score(held_out.images)
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["num_normal_images"] == len(held_out) == 3
    assert calibration["pixel_threshold"] == pytest.approx(np.quantile(maps, 0.999), rel=1e-5)
    if method == "radar":  # the forest decides: anomalous where its score is above 0
        assert (calibration["image_threshold"], calibration["image_decision"]) == (0.0, "isolation_forest")
    else:
        assert calibration["image_threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
        assert np.ptp(scores) > 1e-3 * scores.max()


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_then_predict(trained, data_root, method, tmp_path, capsys):
    run = trained[method]
    maps_dir, pictures_dir = tmp_path / "maps", tmp_path / "pictures"
    code, out, err = cli(capsys, "evaluate", "--run", run, "--maps-out", maps_dir, "--pictures-out", pictures_dir)
    assert code == 0, err
    assert CATEGORY in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["num_test_images"] == 6
    if method == "radar":
        # 16x16 image, 8x8 patches at stride 4: a 3x3 grid, one network call
        assert (metrics["network_calls_per_image"], metrics["sequential_calls_per_image"]) == (9, 1)
        assert metrics["radar_f1"] == metrics["image_f1_at_threshold"]
    else:
        assert (metrics["network_calls_per_image"], metrics["sequential_calls_per_image"]) == (4, 4)
        assert not any(key in metrics for key in RADAR_KEYS)
    tiffs = sorted(p.relative_to(maps_dir).as_posix() for p in maps_dir.rglob("*.tiff"))
    assert tiffs == sorted(f"{CATEGORY}/test/{defect}/{name}.tiff" for defect, name in TEST_IDS)
    heat = tifffile.imread(maps_dir / tiffs[0])
    assert heat.shape == (H, W) and heat.dtype == np.float32 and np.isfinite(heat).all()
    assert (pictures_dir / "overview.png").is_file()
    assert_pixel_metrics_from_tiffs(maps_dir / CATEGORY, metrics)
    rows = image_scores_csv(maps_dir / CATEGORY / "image_scores.csv")
    assert sorted(f"{CATEGORY}/{image}.tiff" for image in rows) == tiffs
    assert_image_metrics_from_csv(rows, metrics)
    if method == "radar":  # the forest's decision: score > 0; its metrics recounted from the decisions
        assert all(anomalous == str(int(score > 0)) for _, score, anomalous in rows.values())
        labels = [label for label, _, _ in rows.values()]
        decided = [int(anomalous) for _, _, anomalous in rows.values()]
        for key, fn in (("accuracy", accuracy_score), ("precision", precision_score), ("recall", recall_score),
                        ("f1", f1_score)):
            extra = {} if key == "accuracy" else {"zero_division": 0.0}
            assert metrics[f"radar_{key}"] == pytest.approx(fn(labels, decided, **extra), abs=1e-12), key

    inputs = copy_inputs(data_root, tmp_path / "inputs")
    out_dir = tmp_path / "predictions"
    code, _, err = cli(capsys, "predict", "--run", run, "--input", inputs, "--out", out_dir)
    assert code == 0, err
    rows = read_scores_csv(out_dir / "scores.csv")
    assert sorted(rows) == sorted(p.stem for p in inputs.iterdir())
    for row in rows.values():
        assert math.isfinite(float(row["score"])) and row["anomalous"] in ("0", "1")
    assert len(list((out_dir / "overlays").glob("*.png"))) == len(list((out_dir / "maps").glob("*.tiff"))) == 4
    # predict and evaluate share the scoring path
    np.testing.assert_allclose(tifffile.imread(out_dir / "maps" / "crack_000.tiff"),
                               tifffile.imread(maps_dir / CATEGORY / "test" / "crack" / "000.tiff"),
                               rtol=1e-5, atol=1e-6)


def test_radar_evaluate_twice_is_identical(trained, capsys):
    results = []
    for _ in range(2):
        code, _, err = cli(capsys, "evaluate", "--run", trained["radar"])
        assert code == 0, err
        results.append(json.loads((trained["radar"] / "metrics.json").read_text()))
    keys = METRIC_KEYS + RADAR_KEYS + ("image_f1_at_threshold", "network_calls_per_image")
    assert {k: results[0][k] for k in keys} == {k: results[1][k] for k in keys}


def test_restored_radar_run_gives_the_forests_labels(trained, data_root, tmp_path, capsys):
    run_dir = trained["radar"]
    inputs = copy_inputs(data_root, tmp_path / "inputs")
    code, _, err = cli(capsys, "predict", "--run", run_dir, "--input", inputs, "--out", tmp_path / "pred")
    assert code == 0, err
    rows = read_scores_csv(tmp_path / "pred" / "scores.csv")
    from fmjax.data import folder

    run = runs.load_run(str(run_dir))
    images, names, _ = folder.load_images(str(inputs), SIZE, 3)
    # the stored forest, read on its own, on features of a freshly restored model
    forest = forest_lib.from_fitted(runs.load_fitted(str(run_dir)))
    features = lambda images: run.scorer.maps_and_features(run.params, images)[1]
    scores = forest_lib.score(forest, features(images))
    labels = (scores > 0).astype(int)
    assert [int(rows[n]["anomalous"]) for n in names] == labels.tolist()
    np.testing.assert_allclose([float(rows[n]["score"]) for n in names], scores, rtol=1e-5, atol=1e-6)
    maps, run_scores = run.score(images)
    np.testing.assert_array_equal(run.decide(run_scores), labels)
    # the forest was fitted on the held-out normals (never trained on): it places its
    # contamination share of them beyond its threshold, no more
    config = run_config(run_dir)
    dataset = data_lib.load(f"folder:{data_root}", CATEGORY, config.data)
    _, held_out = runs.holdout_split(config, dataset.train)
    assert runs.load_fitted(str(run_dir)).values["forest_fitted_on"] == "held_out_normals"
    flagged = int((forest_lib.score(forest, features(held_out.images)) > 0).sum())
    assert flagged <= math.ceil(config.score.contamination * len(held_out))


def test_radar_scoring_override_refits_without_touching_the_run(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained["radar"], run)
    forest_bytes = (run / runs.CALIBRATION_ARRAYS).read_bytes()
    code, _, err = cli(capsys, "evaluate", "--run", run, "--set", "score.t_score=250")
    assert code == 0, err
    metrics = other_metrics(run)
    assert all(math.isfinite(metrics[k]) for k in RADAR_KEYS)
    assert (run / runs.CALIBRATION_ARRAYS).read_bytes() == forest_bytes
    assert run_config(run).score.t_score == RADAR_PRESETS["tiny"].t_score != 250
    code, _, err = cli(capsys, "evaluate", "--run", run, "--set", "score.schedule=cosine")
    assert_one_line_error(code, err)


def test_radar_chooses_its_timestep_and_blur_on_the_held_out_normals(data_root, tmp_path, capsys):
    from fmjax.methods.radar.settings import AUTO, CHOICES

    run = tmp_path / "auto"
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", run,
                       "--method", "radar", *TRAIN_ARGS, "--set", "calibration.holdout_fraction=0.5",
                       "--set", "score.t_score=auto", "--set", "score.sobel_smooth_sigma=auto")
    assert code == 0, err
    assert (run_config(run).score.t_score, run_config(run).score.sobel_smooth_sigma) == (AUTO, AUTO)  # as asked
    calibration = json.loads((run / runs.CALIBRATION).read_text())
    chosen = calibration[runs.SETTINGS]["score"]
    assert chosen["t_score"] in CHOICES["t_score"] and chosen["sobel_smooth_sigma"] in CHOICES["sobel_smooth_sigma"]
    assert calibration[runs.CHOSEN]["candidates"] == 30 and calibration[runs.CHOSEN]["chosen_on"] == 6
    restored = runs.load_run(str(run))
    assert (restored.config.score.t_score, restored.config.score.sobel_smooth_sigma, restored.refit) == (
        chosen["t_score"], chosen["sobel_smooth_sigma"], "")
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert code == 0, err
    # a timestep given for one evaluation is that one, not chosen again
    other = 10 if chosen["t_score"] != 10 else 25
    assert runs.load_run(str(run), [f"score.t_score={other}"]).config.score.t_score == other
    assert calibration == json.loads((run / runs.CALIBRATION).read_text())


# ----------------------------------------------------------------------------- run folders from elsewhere

class _TouchesFile:
    """Unpickling this touches a file: the stand-in for code a crafted pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_crafted_forest_is_refused_and_never_runs(trained, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    run = tmp_path / "run"
    shutil.copytree(trained["radar"], run)
    # a pickle where the forest's arrays belong, and a forest file of the earlier layout
    np.savez(run / runs.CALIBRATION_ARRAYS, forest_children_left=np.array([_TouchesFile(marker)], dtype=object))
    (run / "radar_forest.pkl").write_bytes(pickle.dumps(_TouchesFile(marker)))
    code, _, err = cli(capsys, "evaluate", "--run", run)  # the manifest names the changed file
    assert_one_line_error(code, err)
    assert runs.CALIBRATION_ARRAYS in err and not marker.exists()
    os.remove(run / "manifest.json")  # without it, the arrays are read without unpickling
    for command in (["evaluate", "--run", run], ["predict", "--run", run, "--input", run / "..", "--out",
                                                  tmp_path / "pred"]):
        code, _, err = cli(capsys, *command)
        assert_one_line_error(code, err)
        assert not marker.exists()
    # well-formed arrays that describe no tree (a node that is its own child) are refused too
    fitted = runs.load_fitted(str(trained["radar"]))
    arrays = dict(fitted.arrays)
    arrays["forest_children_left"] = arrays["forest_children_left"].copy()
    arrays["forest_children_left"][0] = 0
    np.savez(run / runs.CALIBRATION_ARRAYS, **arrays)
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err)
    assert "damaged" in err


# ----------------------------------------------------------------------------- bad input

def test_unknown_method(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", out,
                       "--method", "nope", *TRAIN_ARGS)
    assert_one_line_error(code, err)
    assert "nope" in err and not out.exists()


def test_radar_with_pixel_statistics_map_feature_and_memory_bank_exports_alike(trained, data_root, tmp_path,
                                                                                    capsys):
    from helpers import load_test_split, run_config

    from fmjax import data as data_lib
    from fmjax import serving
    from fmjax.methods import image_bank
    from fmjax.methods.radar import forest as forest_lib
    from fmjax.methods.radar import standardize

    run_dir = tmp_path / "run"
    shutil.copytree(trained["radar"], run_dir)
    code, _, err = cli(capsys, "calibrate", "--run", run_dir, "--set", "score.normalize=pixel")
    assert_one_line_error(code, err)  # 3 held-out normals: too few for statistics and a forest
    assert "at least 4 held-out normal images" in err
    run_dir = tmp_path / "pixel"
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", run_dir,
                       "--method", "radar", *TRAIN_ARGS, "--set", "calibration.holdout_fraction=0.5", "--set",
                       "score.normalize=pixel", "--set", "score.map_feature=true", "--set", "score.feature_knn=2")
    assert code == 0, err
    run = runs.load_run(str(run_dir))
    assert run.config.score.normalize == "pixel" and standardize.MEAN in run.fitted.arrays
    # the map feature and the bank distance travel to the export too
    assert forest_lib.from_fitted(run.fitted).num_features == 4
    # the bank holds the clean (t = 0) features of the images the network trained on, none held out
    train = data_lib.load(f"folder:{data_root}", CATEGORY, run_config(run_dir).data).train
    trained_on, _ = runs.holdout_split(run.config, train)
    bank = image_bank.from_arrays(run.fitted.arrays)
    want = image_bank.bank_from_features(run.scorer.features(run.params, trained_on.images))
    for got_part, want_part in zip(bank, want):
        np.testing.assert_allclose(got_part, want_part, rtol=1e-5, atol=1e-5)
    test = load_test_split(run_dir, data_root)
    maps, scores = run.score(test.images)
    code, _, err = cli(capsys, "export", "--run", run_dir, "--out", tmp_path / "exported")
    assert code == 0, err
    got = serving.load(str(tmp_path / "exported"))(test.images)
    # dividing by the per-pixel std (as small as 1e-3 of its mean) before Sobel amplifies
    # float32 rounding, which differs between the exported program and the in-process one
    # (compiled apart, and apart again on each kind of CPU)
    np.testing.assert_allclose(got.maps, maps, atol=1e-4 * np.abs(maps).max(), rtol=1e-3)
    np.testing.assert_allclose(got.scores, scores, atol=1e-5, rtol=1e-5)
    # the statistics are really read: neutral ones score otherwise
    neutral = standardize.neutral(*run.image_shape[:2])
    plain = run.score(test.images, fitted=type(run.fitted)(values=run.fitted.values,
                                                           arrays={**run.fitted.arrays, **neutral}))
    assert np.abs(plain[0] - maps).mean() > 0.01 * np.abs(maps).max()
    # and so is the bank: its last feature is the mean squared distance to the 2 nearest rows
    feats = run.scorer.maps_and_features(run.params, test.images, fitted=run.fitted)[1]
    z = (run.scorer.features(run.params, test.images).astype(np.float64) - bank.mean) / bank.std
    d2 = ((z[:, None, :] - bank.features[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(feats[:, -1], np.sort(d2, 1)[:, :2].mean(1), rtol=1e-3, atol=1e-4)
