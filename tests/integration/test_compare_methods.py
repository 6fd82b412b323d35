"""experiments/compare_methods.py reuses a finished run for the network it trained: other
scoring settings are applied to the restored Run (fitted again on its held-out normals),
other training settings train anew."""
import json
import os
import sys

import pytest
from helpers import CATEGORY, ROOT, SIZE

from fmjax.app.train import train_run
from fmjax.config import build

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare_methods  # noqa: E402

SETTINGS = ["train.steps=4", f"data.image_size={SIZE}", "calibration.holdout_fraction=0.25"]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """(run folder, its config) of a run compare_methods finished (timing.json written)."""
    config = build("tiny", "flow_mismatch", SETTINGS)
    run_dir = tmp_path_factory.mktemp("compare") / "flow_mismatch"
    train_run(config, f"folder:{data_root}", CATEGORY, str(run_dir), progress=False)
    with open(run_dir / "timing.json", "w") as f:
        json.dump({"train_s": 1.5}, f)
    return run_dir, config


def test_the_same_config_reuses_the_run_as_it_is(finished):
    run_dir, config = finished
    run, train_s = compare_methods._finished(str(run_dir), config)
    assert train_s == 1.5 and run.config.score == config.score and not run.refit


def test_other_scoring_settings_reuse_the_network_and_fit_again(finished):
    run_dir, config = finished
    wanted = build("tiny", "flow_mismatch", SETTINGS + ["score.num_paths=3", "score.normalize=global"])
    run, _ = compare_methods._finished(str(run_dir), wanted)
    assert run.config.score == wanted.score
    assert "score.normalize" in run.refit
    with open(run_dir / "config.json") as f:
        assert json.load(f)["score"]["num_paths"] == config.score.num_paths  # the folder is unchanged


@pytest.mark.parametrize("change", ["train.steps=5", "net.base_channels=4", "textures.seed=3"])
def test_other_training_settings_train_anew(finished, change):
    run_dir, _ = finished
    assert compare_methods._finished(str(run_dir), build("tiny", "flow_mismatch", SETTINGS + [change])) is None


def test_a_score_override_reaches_each_method_that_has_the_setting():
    common, score = compare_methods.split_score_overrides(
        ["train.steps=3", "score.feature_knn=3", "score.t_score=100"], ["flow_mismatch", "radar", "pca"])
    assert common == ["train.steps=3"] and score == ["score.feature_knn=3", "score.t_score=100"]
    base = build("tiny", "flow_mismatch", common)
    radar = compare_methods.method_config(base, "radar", score)
    assert radar.method == "radar" and radar.score.feature_knn == 3 and radar.score.t_score == 100
    assert radar.train.steps == 3
    flow = compare_methods.method_config(base, "flow_mismatch", score)
    assert flow.score.feature_knn == 3 and not hasattr(flow.score, "t_score")
    with pytest.raises(SystemExit, match="score.t_score"):  # no method of these has it
        compare_methods.split_score_overrides(["score.t_score=100"], ["flow_mismatch", "pca"])


def test_a_run_without_timing_is_not_finished(tmp_path):
    assert compare_methods._finished(str(tmp_path), build("tiny", "flow_mismatch", SETTINGS)) is None


def test_the_comparison_keeps_each_methods_exported_image_scores_and_tests_them_in_pairs(finished, data_root):
    from sklearn.metrics import roc_auc_score

    from fmjax import data as data_lib
    from fmjax.eval.intervals import auroc_difference

    run_dir, config = finished
    run, _ = compare_methods._finished(str(run_dir), config)
    dataset = data_lib.load(f"folder:{data_root}", CATEGORY, run.config.data)
    result, scores = compare_methods.evaluate(run, dataset)
    assert scores == pytest.approx(run.score(dataset.test.images)[1], rel=1e-6)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(dataset.test.labels, scores), abs=1e-12)
    labels = dataset.test.labels
    others = {"pca": -scores, "patch_nn": scores + labels, "radar": scores[::-1].copy()}
    tests = compare_methods.paired_tests("widget", {"flow_mismatch": scores, **others}, labels)
    assert [(t["a"], t["b"]) for t in tests] == [("flow_mismatch", "pca"), ("flow_mismatch", "patch_nn"),
                                                 ("radar", "pca"), ("radar", "patch_nn"), ("flow_mismatch", "radar")]
    every = {"flow_mismatch": scores, **others}
    for t in tests:
        assert t == {"dataset": "widget", "a": t["a"], "b": t["b"], **auroc_difference(every[t["a"]], every[t["b"]], labels)}
