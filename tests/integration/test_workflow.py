"""The workflow around a trained run, on one tiny run trained through the command line:
config files that reproduce a run, calibration that follows the scoring settings,
evaluation of other data without overwriting the run's metrics."""
import json
import shutil

import jax
import numpy as np
import pytest
from helpers import CATEGORY, TRAIN_ARGS, assert_one_line_error, cli, metric_values, other_metrics

from fmjax import data as data_lib
from fmjax import runs
from fmjax.app.cli import main


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("workflow") / "run"
    code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run), *TRAIN_ARGS])
    assert code == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest


def test_config_json_fed_back_reproduces_the_run(trained_run, data_root, tmp_path, capsys):
    config_path = trained_run / "config.json"
    code, out, err = cli(capsys, "config", "show", "--config", config_path)
    assert code == 0, err
    assert json.loads(out) == json.loads(config_path.read_text())
    again = tmp_path / "again"
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", again,
                       "--config", config_path, "--no-progress")
    assert code == 0, err
    first, second = runs.load_run(str(trained_run)), runs.load_run(str(again))
    assert second.config == first.config
    assert jax.tree.all(jax.tree.map(np.array_equal, first.params, second.params))
    assert second.calibration == first.calibration


def test_calibrate_stores_the_settings_it_fitted_with(trained_run, run_copy, data_root, capsys):
    calibration = json.loads((trained_run / "calibration.json").read_text())
    assert calibration["settings"]["score"] == json.loads((trained_run / "config.json").read_text())["score"]
    assert len(calibration["held_out"]) == calibration["num_normal_images"] == 3

    code, out, err = cli(capsys, "calibrate", "--run", run_copy, "--set", "score.num_times=2",
                         "--set", "calibration.image_threshold_quantile=0.5")
    assert code == 0 and "calibrated on 3 held-out normal images" in out, err
    stored = json.loads((run_copy / "calibration.json").read_text())
    assert stored["settings"]["score"]["num_times"] == 2
    assert stored["settings"]["calibration"]["image_threshold_quantile"] == 0.5
    assert stored["held_out"] == calibration["held_out"]
    # the same thresholds as an evaluation at those settings fits for itself
    fitted = runs.load_run(str(trained_run), ["score.num_times=2", "calibration.image_threshold_quantile=0.5"])
    assert fitted.refit and fitted.calibration == stored
    # from now on the run scores with them: no note, no refit; config.json still says how it trained
    run = runs.load_run(str(run_copy))
    assert (run.config.score.num_times, run.refit) == (2, "")
    assert json.loads((run_copy / "config.json").read_text()) == json.loads((trained_run / "config.json").read_text())
    code, _, err = cli(capsys, "evaluate", "--run", run_copy)
    assert code == 0 and "note:" not in err, err
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--set", "score.num_times=4")
    assert code == 0 and "note: score.num_times 2 -> 4" in err and "calibration.image_threshold_quantile" not in err
    # what the network was trained with cannot change
    code, _, err = cli(capsys, "calibrate", "--run", run_copy, "--set", "train.steps=3")
    assert_one_line_error(code, err)


def test_evaluate_other_data_keeps_the_run_category_and_metrics(trained_run, run_copy, data_root, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    code, _, err = cli(capsys, "evaluate", "--run", run_copy)
    assert code == 0, err
    own = json.loads((run_copy / "metrics.json").read_text())
    code, out, err = cli(capsys, "evaluate", "--run", run_copy, "--data", f"folder:{other}")  # no --category
    assert code == 0, err
    assert json.loads((run_copy / "metrics.json").read_text()) == own
    assert metric_values(other_metrics(run_copy)) == metric_values(own)  # the same images


def test_calibrate_fits_and_stores_normalisation_statistics(trained_run, run_copy, data_root, capsys):
    settings = ["score.normalize=global", "score.map_rule=combined"]
    # the run was trained without them: scoring with them fits them in memory, with a note
    in_memory = runs.load_run(str(trained_run), settings)
    assert "score.normalize 'none' -> 'global'" in in_memory.refit
    assert not (trained_run / "calibration.npz").exists()
    code, _, err = cli(capsys, "calibrate", "--run", run_copy, *[a for s in settings for a in ("--set", s)])
    assert code == 0, err
    stored = runs.load_run(str(run_copy))
    assert stored.refit == "" and (stored.config.score.normalize, stored.config.score.map_rule) == ("global", "combined")
    num_times = stored.config.score.num_times
    assert stored.fitted.arrays["normalize_mean"].shape == (num_times, 1, 1)
    for name, value in in_memory.fitted.arrays.items():
        np.testing.assert_array_equal(stored.fitted.arrays[name], value)
    images = data_lib.load(f"folder:{data_root}", CATEGORY, stored.config.data).test.images
    for a, b in zip(stored.score(images), in_memory.score(images)):
        np.testing.assert_array_equal(a, b)
    # other statistics (per pixel) are fitted again, never the stored global ones reused
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--set", "score.normalize=pixel")
    assert code == 0 and "note: score.normalize 'global' -> 'pixel'" in err, err
