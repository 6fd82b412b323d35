"""The validation protocol: its self-supervised defects, its choice, and the presets that
must equal the committed choice (experiments/results/selection/selection.json)."""
import json
import os
import sys

import numpy as np
import pytest

from fmjax.data import synthetic
from fmjax.methods.flow_mismatch import learned
from fmjax.methods.flow_mismatch.settings import PRESETS
from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import select_settings  # noqa: E402

SELECTION = os.path.join(ROOT, "experiments", "results", "selection", "selection.json")
LEARNED_MAP = os.path.join(ROOT, "experiments", "results", "selection", "learned_map", "learned_map.json")
FEATURES = os.path.join(ROOT, "experiments", "results", "selection", "features", "features.json")
PATCH_FEATURES = os.path.join(ROOT, "experiments", "results", "selection", "features", "patch_features.json")


def test_presets_equal_the_committed_choice():
    with open(SELECTION) as f:
        chosen = json.load(f)
    assert set(chosen) == {"aligned", "texture"}
    for kind, choice in chosen.items():
        assert select_settings.rule_of(PRESETS[kind]) == choice["rule"], kind


def test_the_aligned_feature_form_equals_the_second_stage_choice():
    """The first stage chose the `features` image score; the second (select_features.py)
    its form, scored on the same validation sets."""
    import select_features

    with open(FEATURES) as f:
        chosen = json.load(f)
    assert {field: getattr(PRESETS["aligned"], field) for field in select_features.FIELDS} == chosen["setting"]


def test_the_texture_feature_maps_form_equals_the_second_stage_choice():
    import select_features

    with open(PATCH_FEATURES) as f:
        chosen = json.load(f)
    assert set(chosen["setting"]) == set(select_features.TEXTURE_FIELDS)
    assert {field: getattr(PRESETS["texture"], field) for field in select_features.TEXTURE_FIELDS} == chosen["setting"]


def test_the_texture_form_is_chosen_on_the_mean_criterion_and_a_tie_keeps_the_plain_bank():
    import select_features

    def result(name, values):
        return {"set": name, "rows": [{**form, "criterion": v, "image_auroc": 1.0 - v}
                                      for form, v in zip(select_features.forms(select_features.TEXTURE_GRID), values)]}

    grid = select_features.TEXTURE_GRID
    chosen = select_features.choose([result("a", [0.80, 0.86]), result("b", [0.90, 0.88])], grid, "criterion")
    assert chosen["setting"] == {"patch_whiten": True} and chosen["criterion"] == pytest.approx(0.87)
    chosen = select_features.choose([result("a", [0.80, 0.8004]), result("b", [0.90, 0.9004])], grid, "criterion")
    assert chosen["setting"] == {"patch_whiten": False}


def test_the_feature_form_is_the_best_mean_and_a_tie_keeps_the_simpler():
    import select_features

    def result(name, values):
        return {"set": name, "rows": [{**form, "image_auroc": v} for form, v in zip(select_features.forms(), values)]}

    # forms in order: (0, plain), (0, whitened), (4, plain), (4, whitened); means 0.900, 0.940, 0.915, 0.945
    chosen = select_features.choose([result("a", [0.90, 0.95, 0.91, 0.93]), result("b", [0.90, 0.93, 0.92, 0.96])])
    assert chosen["setting"] == {"feature_grid": 4, "feature_whiten": True}
    assert chosen["criterion"] == pytest.approx(0.945)
    assert [f["criterion"] for f in chosen["forms"]] == pytest.approx([0.900, 0.940, 0.915, 0.945])
    # 0.9404 rounds to 0.940: a tie with the simpler grid 0, which stays
    chosen = select_features.choose([result("a", [0.90, 0.95, 0.91, 0.9304]), result("b", [0.90, 0.93, 0.92, 0.9504])])
    assert chosen["setting"] == {"feature_grid": 0, "feature_whiten": True}


def test_the_learned_map_rule_is_a_preset_rule_only_where_its_report_chose_it():
    with open(LEARNED_MAP) as f:
        report = json.load(f)
    unseen = lambda row: np.mean([report["results"][name][row][1] for name in report["results"]])
    rows = list(next(iter(report["results"].values())))
    assert report["best"] == max(rows, key=unseen)
    assert (PRESETS["texture"].map_rule == "learned") == report["best"].startswith("learned")
    best_learned = max((row for row in rows if row.startswith("learned")), key=unseen)
    assert learned.REGULARIZATION == float(best_learned.split("C = ")[1])


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_each_defect_changes_the_image_where_its_mask_says(kind):
    rng = np.random.default_rng(3)
    image = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out, mask = synthetic.add_anomaly(image, other, kind, np.random.default_rng(5))
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == (64, 64)
    changed = np.any(np.abs(out.astype(int) - image) > 2, axis=-1)
    assert changed.sum() > 10 and mask.sum() < 0.5 * mask.size
    assert mask[changed].all()  # every visibly changed pixel is labelled anomalous
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        synthetic.add_anomaly(image, other, "melt", rng)


def test_choice_is_the_best_mean_over_sets_and_the_ablation_starts_at_the_paper_rule():
    fields = select_settings.RULE_FIELDS

    def row(criterion, **rule):
        full = dict(select_settings.PAPER, num_paths=4, **rule)
        return {**{f: full[f] for f in fields}, "criterion": criterion, "image_auroc": criterion}

    paper = row(0.6)
    norm = row(0.9, normalize="pixel", map_rule="two_sided")
    best_on_one = row(0.99, aggregate="mean")
    sets = [{"set": "a", "kind": "aligned", "rows": [paper, norm, best_on_one]},
            {"set": "b", "kind": "aligned", "rows": [dict(paper, criterion=0.7), dict(norm, criterion=0.8),
                                                      dict(best_on_one, criterion=0.5)]}]
    chosen = select_settings.choose(sets)["aligned"]
    assert chosen["rule"]["normalize"] == "pixel" and chosen["rule"]["aggregate"] == "rank:2"
    assert chosen["criterion"] == pytest.approx(0.85)
    assert chosen["ablation"][0] == ("paper rule", pytest.approx(0.65))


def test_ties_go_to_the_wider_separation():
    fields = select_settings.RULE_FIELDS
    paper = {**{f: dict(select_settings.PAPER, num_paths=4)[f] for f in fields}, "criterion": 1.0,
             "image_auroc": 1.0, "separation": 2.0}
    wide = dict(paper, aggregate="mean", criterion=0.9996, separation=9.0)
    chosen = select_settings.choose([{"set": "a", "kind": "aligned", "rows": [paper, wide]}])["aligned"]
    assert chosen["rule"]["aggregate"] == "mean"



def test_the_map_rule_is_chosen_on_map_scores_then_features_only_when_better():
    fields = select_settings.RULE_FIELDS

    def row(criterion, **rule):
        full = dict(select_settings.PAPER, num_paths=4, **rule)
        return {**{f: full[f] for f in fields}, "criterion": criterion, "image_auroc": criterion, "separation": 1.0}

    norm = dict(normalize="pixel", map_rule="two_sided")
    # features score every map rule alike: the paper map with features must not win the map
    rows = [row(0.80), row(0.85, **norm), row(0.95, image_score="features"),
            row(0.95, image_score="features", **norm)]
    chosen = select_settings.choose([{"set": "a", "kind": "aligned", "rows": rows}])["aligned"]
    assert {f: chosen["rule"][f] for f in ("normalize", "map_rule", "image_score")} == {
        "normalize": "pixel", "map_rule": "two_sided", "image_score": "features"}
    rows[-1] = row(0.8502, image_score="features", **norm)  # a tie at 0.001: the map's own score
    chosen = select_settings.choose([{"set": "a", "kind": "aligned", "rows": rows}])["aligned"]
    assert chosen["rule"]["image_score"] == "max_plus_top1" and chosen["rule"]["normalize"] == "pixel"


import select_radar  # noqa: E402

RADAR_SELECTION = os.path.join(ROOT, "experiments", "results", "selection", "radar.json")


def test_radar_default_equals_the_committed_choice():
    from fmjax.methods.radar.settings import Settings

    with open(RADAR_SELECTION) as f:
        chosen = json.load(f)
    assert {field: getattr(Settings(), field) for field in chosen["setting"]} == chosen["setting"]


@pytest.mark.parametrize("stage", ["radar_aligned.json", os.path.join("radar_aligned_knn", "radar_aligned.json")])
def test_radar_aligned_preset_equals_the_committed_choice_of_the_one_class_sets(stage):
    """The map settings and the forest's side (first stage), then the memory bank's
    distance at that choice (second stage, `--fix`)."""
    from fmjax.methods.radar.settings import PRESETS as RADAR_PRESETS

    with open(RADAR_SELECTION.replace("radar.json", stage)) as f:
        chosen = json.load(f)
    assert {field: getattr(RADAR_PRESETS["aligned"], field) for field in chosen["setting"]} == chosen["setting"]


def test_radar_choice_is_the_best_mean_and_ties_go_to_the_larger_t_score():
    def rows(one_sided=False, **criteria):
        return [{"t_score": int(k[1:]), "sobel_smooth_sigma": 0.0, "one_sided": one_sided, "map_feature": False,
                 "criterion": v} for k, v in criteria.items()]

    sets = [{"rows": rows(t10=0.9, t50=0.7, t250=0.6)}, {"rows": rows(t10=0.5, t50=0.8, t250=0.6)}]
    assert select_radar.choose(sets)["setting"] == {"t_score": 50, "sobel_smooth_sigma": 0.0, "one_sided": False,
                                                    "map_feature": False}
    # textures choose the forest's side too; a tie keeps the paper's two-sided forest
    sided = [{"rows": rows(t50=0.8) + rows(True, t50=0.81)}]
    assert select_radar.choose(sided)["setting"]["one_sided"]
    sided[0]["rows"][1]["criterion"] = 0.8004
    assert not select_radar.choose(sided)["setting"]["one_sided"]
    tied = [{"rows": rows(t10=0.8, t50=0.8004, t250=0.6)}]
    assert select_radar.choose(tied)["setting"]["t_score"] == 50
    tied = [{"rows": rows(t10=0.8004, t50=0.8, t250=0.6)}]
    assert select_radar.choose(tied)["setting"]["t_score"] == 50
    # one-class sets also choose the standardisation; a tie keeps the paper's map
    aligned = [{"rows": [dict(t_score=500, sobel_smooth_sigma=1.0, normalize=n, one_sided=o, map_feature=o,
                              feature_knn=k, criterion=c)
                         for n, o, k, c in (("none", False, 0, 0.8), ("pixel", True, 0, 0.9), ("pixel", True, 5, 0.7))]}]
    assert select_radar.choose(aligned, "aligned")["setting"] == dict(t_score=500, sobel_smooth_sigma=1.0,
                                                                       normalize="pixel", one_sided=True,
                                                                       map_feature=True, feature_knn=0)
    aligned[0]["rows"][1]["criterion"] = 0.8003
    assert select_radar.choose(aligned, "aligned")["setting"]["normalize"] == "none"
    # the memory bank's distance where it is better; a tie keeps the paper's forest without it
    aligned[0]["rows"][0]["criterion"], aligned[0]["rows"][1]["criterion"] = 0.5, 0.9
    aligned[0]["rows"][2]["criterion"] = 0.95
    assert select_radar.choose(aligned, "aligned")["setting"]["feature_knn"] == 5
    aligned[0]["rows"][2]["criterion"] = 0.9004
    assert select_radar.choose(aligned, "aligned")["setting"]["feature_knn"] == 0
    # sets stored before feature_knn joined the grid are read as the stage they were
    earlier = [{"rows": [{f: v for f, v in row.items() if f != "feature_knn"} for row in aligned[0]["rows"][:2]]}]
    assert select_radar.choose(earlier, "aligned")["setting"] == dict(t_score=500, sobel_smooth_sigma=1.0,
                                                                       normalize="pixel", one_sided=True,
                                                                       map_feature=True)


def test_a_second_stage_holds_the_fixed_fields_and_refuses_values_off_the_grid():
    grid = select_radar.grid_of("aligned", "t_score=500,sobel_smooth_sigma=0,normalize=pixel,one_sided=true")
    assert grid["t_score"] == (500,) and grid["sobel_smooth_sigma"] == (0.0,) and grid["normalize"] == ("pixel",)
    assert grid["one_sided"] == (True,) and grid["feature_knn"] == select_radar.GRIDS["aligned"]["feature_knn"]
    for bad in ("t_score=499", "nope=1"):
        with pytest.raises(SystemExit, match=bad.split("=")[0]):
            select_radar.grid_of("aligned", bad)


def test_radar_per_run_choice_is_read_on_the_fold_it_was_not_chosen_on():
    def row(t_score, a, b):  # criterion per fold: (image + pixel) / 2 = a on fold A, b on fold B
        return dict(t_score=t_score, sobel_smooth_sigma=0.0, one_sided=True, map_feature=True, image_auroc_A=a,
                    pixel_auroc_A=a, image_auroc_B=b, pixel_auroc_B=b, criterion=(a + b) / 2)

    # each set's best timestep differs and holds on both folds: a choice per set beats any one value
    sets = [{"rows": [row(50, 0.9, 0.9), row(500, 0.5, 0.5)]}, {"rows": [row(50, 0.6, 0.6), row(500, 0.8, 0.8)]}]
    chosen = select_radar.with_per_run_choice(select_radar.choose(sets), sets)
    assert chosen["per_run"] == pytest.approx(0.85) and chosen["criterion"] == pytest.approx(0.75)
    assert chosen["setting"]["t_score"] == chosen["setting"]["sobel_smooth_sigma"] == "auto"
    # a best that flips between the folds: chosen on one, read on the other, per set loses
    sets = [{"rows": [row(50, 0.9, 0.5), row(500, 0.5, 0.9)]}]
    chosen = select_radar.with_per_run_choice(select_radar.choose(sets), sets)
    assert chosen["per_run"] == pytest.approx(0.5) and chosen["setting"]["t_score"] == 500


def test_image_score_study_mahalanobis_is_per_pixel():
    import image_scores

    rng = np.random.default_rng(0)
    fit, values = rng.normal(size=(40, 3, 2, 2)), rng.normal(size=(5, 3, 2, 2))
    fit[:, 1] += 0.8 * fit[:, 0]  # correlated times, so the covariance matters
    got = image_scores.per_pixel_mahalanobis(fit, values)
    for i, j in ((0, 0), (1, 1)):
        cov = np.cov(fit[:, :, i, j].T)
        cov = (1 - image_scores.SHRINKAGE) * cov + image_scores.SHRINKAGE * np.diag(np.diag(cov))
        d = values[:, :, i, j] - fit[:, :, i, j].mean(0)
        want = np.sqrt(np.einsum("nt,ts,ns->n", d, np.linalg.inv(cov), d) / 3)
        np.testing.assert_allclose(got[:, i, j], want, rtol=1e-10)
    assert image_scores.png_length(np.zeros((8, 8, 1), np.uint8)) < image_scores.png_length(
        rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
