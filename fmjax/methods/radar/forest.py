"""RADAR's Isolation Forest, kept as plain arrays.

scikit-learn fits the forest on the features of normal images (the held-out ones the
network never trained on, `method.Radar.fit`); its trees are then stored as arrays
(children, split feature and threshold, training samples per node) beside one offset,
and scored by `score`, a numpy copy of IsolationForest's decision_function: the same
float64 operations in the same order, so the scores equal scikit-learn's. Nothing is
pickled, so loading a run folder cannot run code, and a damaged or crafted file is
refused with a one-line error.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fmjax.errors import ConfigError, RunError

__all__ = ["Forest", "fit", "from_fitted", "score", "to_fitted"]

_ARRAYS = {  # name -> (dtype kind, number of dimensions)
    "forest_children_left": ("i", 1), "forest_children_right": ("i", 1), "forest_feature": ("i", 1),
    "forest_threshold": ("f", 1), "forest_node_samples": ("i", 1), "forest_tree_starts": ("i", 1),
    "forest_tree_features": ("i", 2),
}


@dataclasses.dataclass(frozen=True)
class Forest:
    """The trees of an Isolation Forest, concatenated: node arrays [total nodes], tree t
    holding nodes tree_starts[t] .. tree_starts[t + 1] - 1 (child indices are within the
    tree, -1 at leaves); tree_features [trees, used features] maps a tree's feature
    index to a column of the input; offset and max_samples as in scikit-learn."""

    children_left: np.ndarray
    children_right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    node_samples: np.ndarray
    tree_starts: np.ndarray
    tree_features: np.ndarray
    offset: float
    max_samples: int
    num_features: int


def fit(features_normal, settings) -> Forest:
    """Fits scikit-learn's IsolationForest on features [N, D] of NORMAL images only
    (test images and their labels never reach the fit); deterministic (random_state =
    settings.forest_seed). Returns its trees as arrays. With settings.one_sided the
    features below the normals' median are raised to it for the fit, so that only values
    above the typical normal's can be isolated (less noise error than usual is not an
    anomaly). Nothing else changes: a tree splits between its samples' smallest and largest
    values, so a feature below the median already takes the median's path when scored."""
    from sklearn.ensemble import IsolationForest

    x = np.asarray(features_normal, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ConfigError(f"the Isolation Forest needs features [N >= 2, D], got shape {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("the Isolation Forest's training features contain NaN or inf")
    if settings.one_sided:
        x = np.maximum(x, np.median(x, axis=0))
    model = IsolationForest(n_estimators=settings.n_estimators, contamination=settings.contamination,
                            max_samples=settings.max_samples or "auto", random_state=settings.forest_seed).fit(x)
    trees = [estimator.tree_ for estimator in model.estimators_]
    return Forest(
        children_left=np.concatenate([t.children_left for t in trees]).astype(np.int64),
        children_right=np.concatenate([t.children_right for t in trees]).astype(np.int64),
        feature=np.concatenate([t.feature for t in trees]).astype(np.int64),
        threshold=np.concatenate([t.threshold for t in trees]).astype(np.float64),
        node_samples=np.concatenate([t.n_node_samples for t in trees]).astype(np.int64),
        tree_starts=np.cumsum([0] + [t.node_count for t in trees]).astype(np.int64),
        tree_features=np.stack([np.asarray(f, np.int64) for f in model.estimators_features_]),
        offset=float(model.offset_), max_samples=int(model.max_samples_), num_features=int(x.shape[1]))


def average_path_length(n) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary search tree of
    n samples (0 for n <= 1, 1 for n = 2), as scikit-learn computes it."""
    n = np.asarray(n, np.float64)
    out = np.zeros(n.shape)
    big = n > 2
    out[n == 2] = 1.0
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _tree_depths(left, right) -> np.ndarray:
    """Nodes on the path from the root to every node of one tree (the root's is 1), from
    children listed after their parent."""
    depth = np.ones(len(left), np.float64)
    for node in range(len(left)):
        if left[node] >= 0:
            depth[left[node]] = depth[right[node]] = depth[node] + 1.0
    return depth


def score(forest: Forest, features) -> np.ndarray:
    """-decision_function of the forest for features [N, D]: float32 [N], higher = more
    anomalous, above 0 exactly where scikit-learn's predict says -1 (anomalous)."""
    x = np.asarray(features, np.float32)  # scikit-learn's trees compare float32 inputs
    if x.ndim != 2 or x.shape[1] != forest.num_features:
        raise ConfigError(f"forest features must be [N, {forest.num_features}], got {list(x.shape)}")
    depths = np.zeros(len(x), np.float64)
    rows = np.arange(len(x))
    for t in range(len(forest.tree_starts) - 1):
        lo, hi = forest.tree_starts[t], forest.tree_starts[t + 1]
        left, right = forest.children_left[lo:hi], forest.children_right[lo:hi]
        feature, threshold = forest.feature[lo:hi], forest.threshold[lo:hi]
        columns = x[:, forest.tree_features[t]]
        node = np.zeros(len(x), np.int64)
        while True:
            inner = left[node] >= 0
            if not inner.any():
                break
            go_left = columns[rows, np.maximum(feature[node], 0)] <= threshold[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        # as scikit-learn: the leaf's path length plus c(its training samples), minus 1
        per_node = _tree_depths(left, right) + average_path_length(forest.node_samples[lo:hi]) - 1.0
        depths += per_node[node]
    denominator = (len(forest.tree_starts) - 1) * average_path_length([forest.max_samples])[0]
    scores = 2 ** (-np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0))
    decision = -scores - forest.offset  # scikit-learn's score_samples - offset_
    return (-decision).astype(np.float32)


def to_fitted(forest: Forest) -> tuple[dict, dict]:
    """(JSON values, named arrays) to store the forest in a run folder."""
    values = {"forest_offset": forest.offset, "forest_max_samples": forest.max_samples,
              "forest_num_features": forest.num_features}
    arrays = {name: getattr(forest, name[len("forest_"):]) for name in _ARRAYS}
    return values, arrays


def from_fitted(fitted) -> Forest:
    """The forest stored by `to_fitted` in `fitted` (a fmjax.methods.base.Fitted), after
    checking that it is a well-formed forest; RunError (one line) if it is missing or
    damaged."""
    if fitted is None or "forest_offset" not in fitted.values:
        raise RunError("the run holds no Isolation Forest: fit it with the run's fmjax train command and --resume "
                       "(nothing is trained again)")

    def fail(why):
        raise RunError(f"the run's Isolation Forest is damaged ({why}): train it again")

    arrays = {}
    for name, (kind, ndim) in _ARRAYS.items():
        a = fitted.arrays.get(name)
        if not isinstance(a, np.ndarray) or a.dtype.kind not in (kind, "u" if kind == "i" else kind) or a.ndim != ndim:
            fail(f"{name} missing or not a {ndim}-D {'integer' if kind == 'i' else 'float'} array")
        arrays[name[len("forest_"):]] = a.astype(np.float64 if kind == "f" else np.int64)
    try:
        offset = float(fitted.values["forest_offset"])
        max_samples = int(fitted.values["forest_max_samples"])
        num_features = int(fitted.values["forest_num_features"])
    except (KeyError, TypeError, ValueError):
        fail("offset, max_samples or num_features missing")
    starts, total = arrays["tree_starts"], len(arrays["children_left"])
    if not (np.isfinite(offset) and max_samples >= 1 and num_features >= 1 and len(starts) >= 2
            and starts[0] == 0 and starts[-1] == total and np.all(np.diff(starts) >= 1)):
        fail("bad offset, sample count or tree layout")
    if any(len(arrays[k]) != total for k in ("children_right", "feature", "threshold", "node_samples")):
        fail("node arrays of different lengths")
    tree_features = arrays["tree_features"]
    if tree_features.shape[0] != len(starts) - 1 or np.any((tree_features < 0) | (tree_features >= num_features)):
        fail("tree feature columns out of range")
    for t in range(len(starts) - 1):
        lo, hi = starts[t], starts[t + 1]
        nodes = np.arange(hi - lo)
        left, right, feature = (arrays[k][lo:hi] for k in ("children_left", "children_right", "feature"))
        leaf = left < 0
        # every inner node's children come after it inside the tree, so a walk always ends
        if (np.any(leaf != (right < 0)) or np.any(~leaf & ((left <= nodes) | (right <= nodes)))
                or np.any(~leaf & ((left >= hi - lo) | (right >= hi - lo)))
                or np.any(~leaf & ((feature < 0) | (feature >= tree_features.shape[1])))):
            fail(f"tree {t} is not a tree")
    if not np.all(np.isfinite(arrays["threshold"])) or np.any(arrays["node_samples"] < 1):
        fail("non-finite thresholds or empty nodes")
    return Forest(**arrays, offset=offset, max_samples=max_samples, num_features=num_features)
