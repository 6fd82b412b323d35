"""The learned map rule (score.map_rule = learned) against the texture preset's rule, on
validation data only.

For each texture the protocol's run and halves are read as experiments/select_settings.py
reads them (`validation_data`): A, held-out normals, fits the statistics, the feature
map's scale and, for the learned rule, its read-out against A with one self-supervised
defect per image (as `FlowMismatch.fit` does: `method.fit_readout`, drawn from
score.seed); B are the validation normals, B with three other self-supervised defects
each the validation anomalies. No test split is read. The criterion is the protocol's:
the mean of image and pixel AUROC, on all kinds of defect and on a kind the read-out was
not fitted on (leave one kind out, the harder and fairer test: real defects are not the
generator's). Rows: the preset's rule, and the learned rule for each regularisation C.

    python experiments/learned_map.py --out OUT --runs RUNS --texture-steps 600

Writes OUT/learned_map.json and OUT/learned_map.md.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_settings  # noqa: E402
from fmjax.data.synthetic import KINDS, anomaly_set  # noqa: E402
from table import command_line  # noqa: E402

REGULARIZATIONS = (0.001, 0.01, 0.1, 1.0)


def texture_rows(name: str, args) -> dict:
    """{row name: (criterion on all kinds, criterion on an unseen kind)} of one texture's
    validation data (`both_criteria`)."""
    import jax.numpy as jnp
    from sklearn.metrics import roc_auc_score

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch import learned
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import per_time_maps, time_weights
    from fmjax.methods.flow_mismatch.settings import PRESETS
    from fmjax.methods.maps import gaussian_smooth, image_score

    preset = PRESETS["texture"]
    run, sets, masks, _, _, trained = select_settings.validation_data(name, f"textures:{name}", None, "texture", args)
    sets["D"], defect_masks = anomaly_set(sets["A"], sets["A"], seed=preset.seed)  # what fit_readout draws
    delta, times = select_settings.stored_mismatch(run, sets, preset.num_paths, preset.num_times)
    raw = select_settings.feature_maps(run, trained, sets)
    feature = {k: gaussian_smooth(jnp.asarray(v), preset.smooth_sigma) for k, v in raw.items()}
    per_time = {k: per_time_maps(jnp.asarray(v), preset.aggregate, preset.smooth_sigma) for k, v in delta.items()}
    weights = time_weights(jnp.asarray(times), preset.time_weight)
    stats = norm.fit_stats(per_time["A"], weights, preset.normalize)

    def criterion(maps_b, maps_v, masks_v):
        """(image AUROC, pixel AUROC) of normals maps_b against anomalies maps_v [N, H, W]."""
        both = np.concatenate([np.asarray(maps_b), np.asarray(maps_v)])
        labels = np.r_[np.zeros(len(maps_b)), np.ones(len(maps_v))]
        pixels = np.concatenate([np.zeros(np.shape(maps_b), bool), masks_v > 0]).ravel()
        scores = np.asarray(image_score(jnp.asarray(both), preset.image_score))
        return metrics.image_metrics(scores, labels)["image_auroc"], float(roc_auc_score(pixels, both.ravel()))

    # anomaly_set gives image i the kind KINDS[i % len(KINDS)]
    kind_of = {k: np.arange(len(sets[k])) % len(KINDS) for k in "VD"}

    def both_criteria(maps_b, maps_v, readout_without=None):
        """(all kinds, mean over kinds k of the criterion on kind k alone, the read-out fitted
        without kind k when `readout_without` is given)."""
        per_kind = []
        for k in range(len(KINDS)):
            pick = kind_of["V"] == k
            b, v = (maps_b, maps_v) if readout_without is None else readout_without(k)
            per_kind.append(np.mean(criterion(b, v[pick], masks[pick])))
        return np.mean(criterion(maps_b, maps_v, masks)), float(np.mean(per_kind))

    mismatch = {k: norm.mismatch_map(per_time[k], weights, preset.normalize, preset.map_rule, stats) for k in "ABV"}
    scale = feat.map_scale(mismatch["A"], feature["A"])
    preset_maps = [np.asarray(feat.combine_maps(mismatch[k], feature[k], scale, preset.feature_map)) for k in "BV"]
    rows = {f"the preset's rule ({preset.map_rule}, feature map {preset.feature_map})": both_criteria(*preset_maps)}
    weighted = norm.mismatch_map(per_time["A"], weights, preset.normalize, "weighted", stats)
    scale = feat.map_scale(weighted, feature["A"])
    values = {k: np.asarray(learned.pixel_values(per_time[k], feature[k], stats, scale)) for k in "ABVD"}
    for c in REGULARIZATIONS:
        def fitted(pick):
            readout = learned.fit_readout(values["A"], values["D"][pick], defect_masks[pick], preset.seed, c)
            return values["B"] @ readout, values["V"] @ readout
        rows[f"learned, C = {c}"] = both_criteria(*fitted(slice(None)),
                                                  readout_without=lambda k: fitted(kind_of["D"] != k))
    return rows


def write_report(results: dict, out: str) -> None:
    names = list(results)
    rows = list(results[names[0]])
    mean = lambda row, i: float(np.mean([results[n][row][i] for n in names]))
    lines = ["# The learned map rule on validation data", "",
             f"Command: `{command_line()}`", "",
             "Criterion: the mean of image and pixel AUROC. Each cell: all kinds / unseen kind. *All kinds*: "
             "the validation anomalies of every kind, the read-out fitted on defects of every kind (the same "
             "generator). *Unseen kind*: the mean over the five kinds k of the criterion on kind k's anomalies "
             "alone, the read-out fitted on defects of the other four (a defect kind the fit never saw, as a real "
             "one is). No test split is read.", "",
             "| rule | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{results[n][row][0]:.3f} / {results[n][row][1]:.3f}"
                                                for n in names) + f" | {mean(row, 0):.3f} / {mean(row, 1):.3f} |")
    best = max(rows, key=lambda r: mean(r, 1))
    lines += ["", f"Best mean criterion on an unseen kind: **{best}**."]
    with open(os.path.join(out, "learned_map.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "learned_map.json"), "w") as f:
        json.dump({"command": command_line(), "results": results, "best": best}, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    args = select_settings.texture_study_parser(__doc__.splitlines()[0]).parse_args()
    write_report(select_settings.run_texture_study(args, texture_rows), args.out)


if __name__ == "__main__":
    main()
