"""A Flow Mismatching run whose maps use statistics of held-out normals (and the learned
rule's read-out): they come from one half of the held-out normals, the thresholds from
the other half, all stored in the run and used again after a reload."""
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import data as data_lib
from fmjax import runs
from fmjax.app.cli import main
from fmjax.errors import ScoreRuleError
from fmjax.eval.metrics import threshold_from_normals
from fmjax.methods.base import Fitted
from fmjax.methods.flow_mismatch import learned
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.method import fit_readout
from fmjax.methods.flow_mismatch.scorer import interior_times, time_weights
from helpers import CATEGORY, SIZE, TRAIN_ARGS, make_tree

NORMALIZED = ["--set", "score.normalize=pixel", "--set", "score.map_rule=two_sided", "--set", "score.smooth_sigma=1",
              "--set", "score.image_score=mean", "--set", "calibration.holdout_fraction=0.5"]


def trained(tmp_path_factory, name: str, settings: list) -> tuple:
    """(data root, run folder) of a tiny run trained with `settings` (--set arguments)."""
    root = make_tree(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / name
    assert main(["train", "--data", f"folder:{root}", "--category", CATEGORY, "--out", str(out),
                 *TRAIN_ARGS, *settings]) == 0
    return root, out


def held_out_halves(root, run) -> tuple:
    """The run's six held-out normals cut as its fit cuts them: (statistics half, thresholds half)."""
    cal = run.config.calibration
    train = data_lib.load(f"folder:{root}", CATEGORY, run.config.data).train
    _, holdout = data_lib.split_holdout(train, cal.holdout_fraction, cal.seed)
    assert len(holdout) == 6
    return holdout.subset(slice(0, 3)), holdout.subset(slice(3, 6))


@pytest.fixture(scope="module")
def normalized_run(tmp_path_factory):
    return trained(tmp_path_factory, "normalized", NORMALIZED)


def test_statistics_and_thresholds_come_from_disjoint_halves_of_the_held_out_normals(normalized_run):
    root, out = normalized_run
    run = runs.load_run(str(out))
    settings, cal = run.config.score, run.config.calibration
    for_stats, for_thresholds = held_out_halves(root, run)
    assert run.fitted.values["num_normalization_images"] == 3 and run.fitted.values["num_normal_images"] == 3

    per_time = run.scorer.per_time(run.params, for_stats.images)
    expected = norm.fit_stats(per_time, time_weights(interior_times(settings.num_times), settings.time_weight),
                              "pixel")
    stored = norm.from_arrays(run.fitted.arrays, settings.num_times, (SIZE, SIZE))
    assert stored.mean.shape == (settings.num_times, SIZE, SIZE)
    for a, b in zip(stored, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6)

    maps, scores = run.score(for_thresholds.images)
    assert run.fitted.values["image_threshold"] == pytest.approx(
        threshold_from_normals(scores, cal.image_threshold_quantile))
    assert run.fitted.values["pixel_threshold"] == pytest.approx(float(np.quantile(maps, cal.pixel_threshold_quantile)))
    # the image score is the mean of the map
    np.testing.assert_allclose(scores, maps.mean((1, 2)), rtol=1e-5)


def test_a_reloaded_normalized_run_scores_the_same(normalized_run):
    root, out = normalized_run
    test = data_lib.load(f"folder:{root}", CATEGORY, runs.load_run(str(out)).config.data).test
    first = runs.load_run(str(out)).score(test.images)
    second = runs.load_run(str(out)).score(test.images)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # without the statistics the same settings cannot score
    run = runs.load_run(str(out))
    with pytest.raises(Exception, match="normalisation statistics"):
        run.score(test.images, fitted=type(run.fitted)())


LEARNED = ["--set", "score.normalize=global", "--set", "score.map_rule=learned", "--set", "score.smooth_sigma=1",
           "--set", "calibration.holdout_fraction=0.5"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    return trained(tmp_path_factory, "learned", LEARNED)


def test_the_learned_readout_is_fitted_on_the_statistics_half_and_scores_after_a_reload(learned_run):
    root, out = learned_run
    run = runs.load_run(str(out))
    settings = run.config.score
    for_stats, _ = held_out_halves(root, run)
    per_time = run.scorer.per_time(run.params, for_stats.images)
    stats = norm.fit_stats(per_time, time_weights(interior_times(settings.num_times), settings.time_weight), "global")
    expected = fit_readout(run, for_stats, per_time, None, stats, np.array([0, 1, 0, 1], np.float32), {})
    stored = norm.from_arrays(run.fitted.arrays, settings.num_times, (SIZE, SIZE))
    assert np.any(stored.readout)
    np.testing.assert_allclose(stored.readout, expected, rtol=1e-4, atol=1e-6)

    test = data_lib.load(f"folder:{root}", CATEGORY, run.config.data).test
    maps, _ = run.score(test.images)
    values = learned.pixel_values(jnp.asarray(run.scorer.per_time(run.params, test.images)), None, stored,
                                  np.array([0, 1, 0, 1], np.float32))
    np.testing.assert_allclose(maps, np.asarray(values) @ stored.readout, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(maps, runs.load_run(str(out)).score(test.images)[0])


def test_a_learned_rule_without_its_readout_says_how_to_fit_it(learned_run):
    _, out = learned_run
    run = runs.load_run(str(out))
    arrays = {k: v for k, v in run.fitted.arrays.items() if k != "normalize_readout"}
    with pytest.raises(ScoreRuleError, match="fmjax calibrate"):
        run.scorer.stats(Fitted(values=run.fitted.values, arrays=arrays))
