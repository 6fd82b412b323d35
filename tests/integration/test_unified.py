"""`--category all`: one model on every category (grey and colour mixed), per-category rows,
each category scored with its own class label."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image
from helpers import (CATEGORY, TRAIN_ARGS, assert_image_metrics_from_csv, assert_pixel_metrics_from_tiffs, cli,
                     csv_scores, image_scores_csv, make_tree, other_metrics, reference_run_scores, run_config)

from fmjax import data as data_lib
from fmjax.app.cli import main
from fmjax.config import preset


@pytest.fixture(scope="module")
def two_category_root(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("data"))
    # a second, grey category: the widget tree converted to "L"
    for path in sorted((root / CATEGORY).rglob("*.png")):
        dest = root / "gadget" / path.relative_to(root / CATEGORY)
        dest.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        (image if "ground_truth" in str(path) else image.convert("L")).save(dest)
    return root


def test_load_all_mixes_grey_into_colour(two_category_root):
    config = preset("tiny").data
    datasets = data_lib.load_all(f"folder:{two_category_root}", config)
    assert [d.category for d in datasets] == ["gadget", "widget"]
    assert {d.train.images.shape[-1] for d in datasets} == {3}
    gadget = datasets[0].train.images
    np.testing.assert_array_equal(gadget[..., 0], gadget[..., 2])  # grey copied to all channels
    train = data_lib.unified_train(datasets)
    assert len(train) == sum(len(d.train) for d in datasets)
    np.testing.assert_array_equal(train.class_ids, np.repeat([0, 1], [len(d.train) for d in datasets]))
    assert not train.labels.any()  # anomaly labels: every training image is normal


def test_unified_train_and_evaluate(two_category_root, tmp_path, capsys):
    run = tmp_path / "all_run"
    code, _, err = cli(capsys, "train", "--data", f"folder:{two_category_root}", "--category", "all",
                       "--out", run, *TRAIN_ARGS, "--set", "net.num_classes=2")
    assert code == 0, err
    info = json.loads((run / "data.json").read_text())
    assert info == {"spec": f"folder:{two_category_root}", "category": "all", "categories": ["gadget", "widget"]}
    maps = tmp_path / "maps"
    code, out, err = cli(capsys, "evaluate", "--run", run, "--maps-out", maps)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["per_category"]
    assert [r["category"] for r in rows] == ["gadget", "widget"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in rows]))
    assert "gadget" in out and "widget" in out and "mean" in out
    datasets = data_lib.load_all(f"folder:{two_category_root}", run_config(run).data)
    for class_id, (dataset, row) in enumerate(zip(datasets, rows)):
        cat = dataset.category
        tiffs = sorted((maps / cat / "test").rglob("*.tiff"))
        assert len(tiffs) == 6 and tifffile.imread(tiffs[0]).shape == (20, 24)
        csv_rows = image_scores_csv(maps / cat / "image_scores.csv")
        assert_image_metrics_from_csv(csv_rows, row)
        assert_pixel_metrics_from_tiffs(maps / cat, row)
        # scored with the category's own label, which the class-conditional network heeds
        test = dataset.test
        got = csv_scores(csv_rows, test.names)
        _, want = reference_run_scores(run, test.images, labels=np.full(len(test), class_id))
        _, other = reference_run_scores(run, test.images, labels=np.full(len(test), 1 - class_id))
        np.testing.assert_allclose(got, want, rtol=1e-4)
        assert np.all(np.abs(other - want) > 1e-3 * np.abs(want)), (cat, other, want)

    # one category of the unified run gives the same row as in the full evaluation
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    code, _, err = cli(capsys, "evaluate", "--run", copy, "--category", "widget")
    assert code == 0, err
    single = other_metrics(copy)
    assert single["image_auroc"] == rows[1]["image_auroc"] and single["aupro"] == rows[1]["aupro"]

    # predict scores images with the class label of the category they show, as evaluate does
    widget = two_category_root / "widget" / "test" / "crack"
    csv_rows = image_scores_csv(maps / "widget" / "image_scores.csv")
    code, _, err = cli(capsys, "predict", "--run", run, "--input", widget, "--out", tmp_path / "p", "--category",
                       "widget")
    assert code == 0, err
    with open(tmp_path / "p" / "scores.csv", newline="") as f:
        predicted = {row["image"]: float(row["score"]) for row in csv.DictReader(f)}
    assert len(predicted) == 3
    for name, score in predicted.items():
        assert score == pytest.approx(csv_rows[f"test/crack/{os.path.splitext(name)[0]}"][1], rel=1e-5), name
    for argv, message in ((["--out", tmp_path / "q"], "pass --category"),
                          (["--out", tmp_path / "q", "--category", "sprocket"], "not of 'sprocket'")):
        code, _, err = cli(capsys, "predict", "--run", run, "--input", widget, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "q").exists()


def test_unified_rejects_wrong_class_count(two_category_root, tmp_path, capsys):
    code = main(["train", "--data", f"folder:{two_category_root}", "--category", "all", "--out",
                 str(tmp_path / "r"), *TRAIN_ARGS, "--set", "net.num_classes=5"])
    err = capsys.readouterr().err
    assert code == 2 and "num_classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
