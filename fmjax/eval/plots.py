"""Figures of an evaluation with matplotlib (the optional `plots` extra; without it
`available()` is False and nothing is drawn): ROC and PR curves of the image scores,
the per-defect-type image AUROC, and the histogram of normal and anomalous image
scores with the fitted threshold; and line plots of study results (metric against a
setting, one line per rule). Each figure is a PNG with real axes and ticks."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["FIGURES", "available", "line_figure", "write_figures", "write_line_plot"]

FIGURES = ("roc_pr.png", "defect_auroc.png", "score_histogram.png")


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(figsize):
    """A matplotlib Figure outside pyplot: no backend is chosen or changed (a notebook's
    inline backend stays), nothing is kept after it is saved."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _roc_pr(labels, scores):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    fig = _figure((9, 4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc_ax.plot(fpr, tpr, lw=1.5)
    roc_ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"image ROC (AUROC {roc_auc_score(labels, scores):.3f})")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr_ax.plot(recall, precision, lw=1.5)
    pr_ax.axhline(labels.mean(), color="k", ls=":", lw=0.8)
    pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
              title=f"image PR (AP {average_precision_score(labels, scores):.3f})")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
    return fig


def _defect_auroc(labels, scores, defect_types):
    """AUROC of each defect type's images against all normal images."""
    from sklearn.metrics import roc_auc_score

    normal = labels == 0
    kinds = sorted({t for t, label in zip(defect_types, labels) if label == 1})
    values = [roc_auc_score(np.r_[np.zeros(normal.sum()), np.ones(sum(t == k for t in defect_types))],
                            np.r_[scores[normal], scores[np.asarray(defect_types) == k]]) for k in kinds]
    fig = _figure((max(5.0, 0.7 * len(kinds) + 2), 4))
    ax = fig.subplots()
    bars = ax.bar(range(len(kinds)), values, width=0.6, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.set_xlim(-0.75, len(kinds) - 0.25)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    tilted = len(kinds) > 4
    ax.set_xticks(range(len(kinds)), kinds, rotation=45 if tilted else 0, ha="right" if tilted else "center")
    ax.set(ylim=(0, 1.08), ylabel="image AUROC against all normal images", title="image AUROC per defect type")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _histogram(labels, scores, threshold):
    fig = _figure((6, 4))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 4)))
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({int((labels == 1).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="image score", ylabel="test images", title="image scores of the test split")
    ax.legend()
    return fig


def write_figures(out_dir: str, labels, scores, defect_types, threshold=None) -> list[str]:
    """Writes FIGURES into `out_dir` for labels int [N] (1 = anomalous), image scores
    float [N], defect_types N strings ("good" for normal images) and the fitted image
    threshold (None: not drawn); returns the names written: none without matplotlib,
    and the curves only where both classes are present."""
    if not available():
        return []
    labels, scores = np.asarray(labels, np.int32), np.asarray(scores, np.float64)
    figures = {"score_histogram.png": lambda: _histogram(labels, scores, threshold)}
    if 0 < labels.sum() < len(labels):
        figures["roc_pr.png"] = lambda: _roc_pr(labels, scores)
        figures["defect_auroc.png"] = lambda: _defect_auroc(labels, scores, list(defect_types))
    written = []
    for name in FIGURES:
        if name in figures:
            fig = figures[name]()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, name), dpi=100)
            written.append(name)
    return written


def line_figure(series: dict, xlabel: str, ylabel: str, title: str | None = None):
    """A Figure of series = {name: [(x, y), ...]}: one line per name, the x values at even
    spacing in their sorted order with their own tick labels (K = 1, 2, 4, 8, 16 read
    as steps), non-finite y left out."""
    xs = sorted({x for points in series.values() for x, _ in points})
    fig = _figure((6.5, 4.2))
    ax = fig.subplots()
    for name, points in series.items():
        points = sorted((x, y) for x, y in points if np.isfinite(y))
        ax.plot([xs.index(x) for x, _ in points], [y for _, y in points], marker="o", lw=1.5, label=str(name))
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or f"{ylabel} against {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def write_line_plot(path: str, series: dict, xlabel: str, ylabel: str, title: str | None = None) -> bool:
    """`line_figure` as a PNG at `path`; False (nothing written) without matplotlib."""
    if not available():
        return False
    fig = line_figure(series, xlabel, ylabel, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
