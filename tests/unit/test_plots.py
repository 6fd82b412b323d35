"""Figures of an evaluation (fmjax.eval.plots): what they draw and that the core runs
without matplotlib."""
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from fmjax.eval import plots

pytest.importorskip("matplotlib")

LABELS = np.array([0] * 6 + [1] * 6)
SCORES = np.array([0.1, 0.2, 0.3, 0.25, 0.15, 0.5, 0.9, 0.8, 0.7, 0.2, 0.6, 0.4])
TYPES = ["good"] * 6 + ["crack"] * 3 + ["stain"] * 3


def test_figures_are_written_with_what_they_show(tmp_path):
    written = plots.write_figures(str(tmp_path), LABELS, SCORES, TYPES, threshold=0.45)
    assert written == list(plots.FIGURES)
    for name in written:
        image = np.asarray(Image.open(tmp_path / name).convert("L"))
        assert image.shape[0] >= 300 and image.std() > 5  # drawn, not blank
    bars = plots._defect_auroc(LABELS, SCORES.astype(float), TYPES)
    heights = [p.get_height() for p in bars.axes[0].patches]
    normal = SCORES[:6]
    assert heights == pytest.approx([roc_auc_score([0] * 6 + [1] * 3, np.r_[normal, SCORES[6:9]]),
                                     roc_auc_score([0] * 6 + [1] * 3, np.r_[normal, SCORES[9:]])])
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == ["crack", "stain"]
    hist = plots._histogram(LABELS, SCORES, 0.45)
    assert [line.get_xdata()[0] for line in hist.axes[0].lines] == [0.45]
    assert sum(p.get_height() for p in hist.axes[0].patches) == len(SCORES)


def test_line_plots_show_every_series_at_its_x_values(tmp_path):
    series = {"min": [(4, 0.7), (1, 0.5), (16, 0.9)], "mean": [(1, 0.6), (4, float("nan")), (16, 0.8)]}
    fig = plots.line_figure(series, "K", "AUROC")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines] == [
        ([0, 1, 2], [0.5, 0.7, 0.9]), ([0, 2], [0.6, 0.8])]
    assert ax.get_xlabel() == "K" and ax.get_ylabel() == "AUROC"
    assert plots.write_line_plot(str(tmp_path / "k.png"), series, "K", "AUROC")
    assert Image.open(tmp_path / "k.png").size == (650, 420)


def test_one_class_draws_the_histogram_only(tmp_path):
    assert plots.write_figures(str(tmp_path), np.zeros(4), np.arange(4.0), ["good"] * 4) == ["score_histogram.png"]


def test_drawing_leaves_pyplot_and_its_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    plots.write_figures(str(tmp_path), LABELS, SCORES, TYPES, 0.45)
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_without_matplotlib_nothing_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots.available()
    assert plots.write_figures(str(tmp_path), LABELS, SCORES, TYPES, 0.45) == []
    assert not plots.write_line_plot(str(tmp_path / "k.png"), {"a": [(1, 0.5)]}, "K", "AUROC")
    assert list(tmp_path.iterdir()) == []
