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
    code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run), *TRAIN_ARGS,
                 "--logdir", str(run.parent / "logs")])
    assert code == 0
    return run


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


def test_logdir_holds_the_training_log_and_the_metrics_as_tensorboard_events(trained_run, run_copy, capsys):
    from fmjax.eval.events import read_scalars
    from fmjax.training.state import learning_rate

    logged = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    events = read_scalars(str(trained_run.parent / "logs"))
    for key in ("loss", "grad_norm", "images_per_s"):
        assert events[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in logged]
    config = runs.load_run(str(trained_run)).config
    assert events["train/learning_rate"] == [(r["step"], pytest.approx(learning_rate(config.train, r["step"] - 1)))
                                             for r in logged]
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--logdir", run_copy / "eval_logs")
    assert code == 0, err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    # no maps exported, but the test split has defect masks: the pixel metrics need the maps
    assert metrics["maps_scored"] and np.isfinite(metrics["pixel_auroc"])
    events = read_scalars(str(run_copy / "eval_logs"))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert events[f"eval/{CATEGORY}/{key}"] == [(config.train.steps, pytest.approx(metrics[key], rel=1e-6))]


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


# ----------------------------------------------------------------------------- export and the Python API

# a child that cannot import Flax, Optax, Orbax, scikit-*, PIL or fmjax's model,
# training, config and run code: what fmjax.serving may need is JAX and numpy
SERVING_CHILD = r"""
import importlib.abc, json, sys
import numpy as np

BLOCKED = ("flax", "optax", "orbax", "sklearn", "skimage", "PIL", "tensorflow", "fmjax.nets",
           "fmjax.training", "fmjax.config", "fmjax.runs", "fmjax.api", "fmjax.app", "fmjax.data",
           "fmjax.methods.flow_mismatch", "fmjax.methods.base", "fmjax.eval")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {name}")
        return None


sys.meta_path.insert(0, Block())
from fmjax import serving
from fmjax.errors import DataError

scorer = serving.load(sys.argv[1])
images = np.load(sys.argv[2])
maps, scores, anomalous = scorer(images)
grey_float = scorer(images[..., :1].astype(np.float32) / 255.0)
try:
    scorer(images[0])
    refused = ""
except DataError as err:
    refused = str(err)
np.savez(sys.argv[3], maps=maps, scores=scores, anomalous=anomalous, grey_maps=grey_float.maps)
print(json.dumps({"refused": refused, "modules": sorted(m for m in sys.modules if m.startswith("fmjax"))}))
"""


def test_exported_scorer_equals_the_run_with_jax_and_numpy_only(trained_run, data_root, tmp_path, capsys):
    import subprocess
    import sys

    from helpers import load_test_split, subprocess_env

    export_dir = tmp_path / "exported"
    code, out, err = cli(capsys, "export", "--run", trained_run, "--out", export_dir)
    assert code == 0 and "exported flow_mismatch scorer for cpu" in out, err
    test = load_test_split(trained_run, data_root)
    np.save(tmp_path / "images.npy", test.images)
    child = subprocess.run([sys.executable, "-c", SERVING_CHILD, str(export_dir), str(tmp_path / "images.npy"),
                            str(tmp_path / "out.npz")], env=subprocess_env(1, fast_compile=False),
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert "images must be [N, H, W, C]" in report["refused"] and "image[None]" in report["refused"]
    assert set(report["modules"]) <= {"fmjax", "fmjax.errors", "fmjax.files", "fmjax.serving", "fmjax.version",
                                     "fmjax.xla_options"}
    got = np.load(tmp_path / "out.npz")
    run = runs.load_run(str(trained_run))
    maps, scores = run.score(test.images)
    np.testing.assert_allclose(got["maps"], maps, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["scores"], scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got["anomalous"], run.decide(scores).astype(bool))
    # grey float images are the same images once repeated to RGB and rounded
    grey = np.repeat(test.images[..., :1], 3, axis=-1)
    np.testing.assert_allclose(got["grey_maps"], run.score(grey)[0], atol=1e-5, rtol=1e-5)
    # a changed file is refused
    (export_dir / "arrays.npz").write_bytes((export_dir / "arrays.npz").read_bytes()[:-8])
    from fmjax import serving
    from fmjax.errors import RunError

    with pytest.raises(RunError, match="not the file fmjax export wrote"):
        serving.load(str(export_dir))


def test_python_api_scores_images_of_any_size_as_predict_does(trained_run, tmp_path):
    import csv

    from PIL import Image

    import fmjax

    det = fmjax.load(str(trained_run))
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(rgb).save(inputs / "a_rgb.png")
    Image.fromarray(grey).save(inputs / "b_grey.png")
    scored = det.score([rgb, grey.astype(np.float32) / 255.0])
    assert [m.shape for m in scored.maps] == [(30, 41), (12, 9)] and scored.anomalous.dtype == bool
    rows = det.predict(str(inputs), str(tmp_path / "pred"))
    assert [r["image"] for r in rows] == ["a_rgb", "b_grey"]
    np.testing.assert_allclose([r["score"] for r in rows], scored.scores, rtol=1e-6)
    # an array at the run's size: exactly Run.score
    images = rng.integers(0, 256, (3,) + det.image_shape, dtype=np.uint8)
    maps, scores = det.run.score(images)
    again = det.score(images)
    np.testing.assert_array_equal(again.maps, maps)
    np.testing.assert_array_equal(again.scores, scores)
    with open(tmp_path / "pred" / "scores.csv", newline="") as f:
        assert [row["image"] for row in csv.DictReader(f)] == ["a_rgb", "b_grey"]


@pytest.mark.parametrize("settings,platforms", [
    (["score.normalize=pixel", "score.map_rule=two_sided", "score.smooth_sigma=1", "score.feature_knn=2",
      "score.feature_grid=2", "score.feature_whiten=true", "score.feature_map=0.5"], "cpu"),
    (["score.normalize=global", "score.map_rule=combined"], "cpu,cuda,tpu")])
def test_exported_scorer_carries_the_normalisation_statistics_and_feature_bank(trained_run, data_root, tmp_path, capsys, settings,
                                                              platforms):
    from helpers import load_test_split

    from fmjax import serving

    export_dir = tmp_path / "exported"
    code, out, err = cli(capsys, "export", "--run", trained_run, "--out", export_dir, "--platforms", platforms,
                         *[a for s in settings for a in ("--set", s)])
    assert code == 0 and "score.normalize 'none' ->" in err, err
    assert f"scorer for {platforms.replace(',', ', ')}" in out
    run = runs.load_run(str(trained_run), settings)
    assert "normalize_mean" in run.fitted.arrays
    assert ("features_features" in run.fitted.arrays) == ("score.feature_knn=2" in settings)
    if "score.feature_whiten=true" in settings:  # the whitened bank of the 2 x 2 cells' features
        whiten = run.fitted.arrays["features_whiten"]
        assert whiten.shape == (4 * run.config.net.base_channels * run.config.net.channel_mult[-1],) * 2
        assert np.abs(whiten - np.eye(len(whiten))).max() > 0.1
    assert ("patches_features" in run.fitted.arrays) == ("score.feature_map=0.5" in settings)
    test = load_test_split(trained_run, data_root)
    maps, scores = run.score(test.images)
    got = serving.load(str(export_dir))(test.images)
    # (a nearest-row distance |q|^2 - 2 q.b + |b|^2 rounds differently in another program)
    np.testing.assert_allclose(got.maps, maps, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.scores, scores, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.anomalous, run.decide(scores).astype(bool))
    # without its statistics the program would score otherwise: they are really in it
    plain = run.score(test.images, fitted=type(run.fitted)(arrays={
        k: (np.zeros_like(v) if k.endswith(("mean", "center")) else np.ones_like(v)) for k, v in run.fitted.arrays.items()}))
    assert np.abs(plain[0] - got.maps).max() > 1e-3
