"""Image scores for semantic (one-class) anomalies, compared on the validation protocol.

The `aligned` preset scores an image by the mean of its two-sided map. This study reads
the same stored mismatch as `select_settings.py` (held-out normals A fit every
statistic, B are the validation normals, V the other classes' training images; no test
split) and compares, at the preset's paths, aggregate and smoothing:
  map rules     the preset's two-sided map; the t^2-weighted z-scores; the two-sided
                map over the early (noisy, t <= 1/2) or the late times only; a per-pixel
                Mahalanobis distance over the T log-mismatches (covariance fitted on A);
  image scores  mean (the preset), max + top-1% mean, energy (log-mean-exp of the map);
                an image-level Gaussian over the T per-time means of the log z-scores;
  complexity    the PNG length of the image alone, the preset's score minus its linear
                trend in PNG length fitted on A (the input-complexity correction), and
                the preset's score plus |z| of the PNG length (both standardised on A).

    python experiments/image_scores.py --out experiments/results/selection/image_scores \
        --runs OUT/runs --aligned fashion_mnist:0,digits:0,digits:1

reuses the runs of `select_settings.py` (same folder names) or trains them (about 45
minutes for Fashion-MNIST, a minute for a digit). Each set is scored with `--path-seeds`
independent draws of the noise paths: the table gives the mean AUROC over the draws and
their range, since with K = 4 paths the draws alone move an AUROC by about 0.01. Writes
OUT/image_scores.{json,md}.

    python experiments/image_scores.py --out OUT --aligned fashion_mnist:0 --path-study 16

instead draws 16 paths once and reads the preset's map from disjoint groups of 4, 8
and 16 of them, per path aggregate: whether more paths help (OUT/paths.{json,md}).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from select_settings import digits_folder, stored_mismatch, validation_data  # noqa: E402
from table import command_line  # noqa: E402

SHRINKAGE = 0.1  # of the per-pixel covariance towards its diagonal


def png_length(image) -> int:
    """Bytes of the image as an optimised PNG: its input complexity."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)[..., 0] if image.shape[-1] == 1 else np.asarray(image)).save(
        buffer, "PNG", optimize=True)
    return len(buffer.getvalue())


def per_pixel_mahalanobis(logs_fit, logs):
    """logs_fit [N, T, H, W] (normals), logs [M, T, H, W] -> [M, H, W]: the distance of
    each pixel's T log-mismatches from the normals' at that pixel, over sqrt(T)."""
    mean = logs_fit.mean(0)
    centred = logs_fit - mean
    cov = np.einsum("nthw,nshw->hwts", centred, centred) / (len(logs_fit) - 1)
    eye = np.eye(cov.shape[-1])
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.einsum("hwtt,ts->hwts", cov, eye)
    inverse = np.linalg.inv(cov)
    d = logs - mean
    return np.sqrt(np.einsum("nthw,hwts,nshw->nhw", d, inverse, d) / cov.shape[-1])


def gaussian_distance(fit, values):
    """fit [N, D], values [M, D] -> [M]: squared Mahalanobis distance under the Gaussian of `fit`."""
    mean = fit.mean(0)
    inverse = np.linalg.inv(np.cov(fit.T) + 1e-6 * np.eye(fit.shape[1]))
    d = values - mean
    return np.einsum("ni,ij,nj->n", d, inverse, d)


def variant_scores(delta, times, images, preset) -> dict:
    """({variant: (scores of B [N_B], scores of V [N_V])}, the correlation of the preset's
    score with PNG length on A) from delta {A, B, V: [N, T, K, H, W]} and the images."""
    import jax.numpy as jnp

    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import per_time_maps, time_weights
    from fmjax.methods.maps import image_score

    weights = time_weights(jnp.asarray(times), "t2")
    per_time = {n: np.asarray(per_time_maps(jnp.asarray(d[:, :, :preset.num_paths]), preset.aggregate,
                                            preset.smooth_sigma), np.float64) for n, d in delta.items()}
    stats = norm.fit_stats(per_time["A"], weights, preset.normalize)

    def mapped(rule, names="ABV", time_index=slice(None)):
        sub = stats._replace(mean=stats.mean[time_index], std=stats.std[time_index],
                             log_mean=stats.log_mean[time_index], log_std=stats.log_std[time_index])
        return {n: np.asarray(norm.mismatch_map(jnp.asarray(per_time[n][:, time_index], jnp.float32),
                                                weights[time_index], preset.normalize, rule, sub), np.float64)
                for n in names}

    def scored(maps, spec):
        return {n: np.asarray(image_score(jnp.asarray(m, jnp.float32), spec), np.float64) for n, m in maps.items()}

    early = np.asarray(times) <= 0.5
    two_sided = mapped("two_sided")
    logs = {n: np.log(p + norm.LOG_EPS) for n, p in per_time.items()}
    z = {n: (logs[n] - stats.log_mean) / stats.log_std for n in logs}
    complexity = {n: np.array([png_length(x) for x in images[n]], np.float64) for n in images}
    preset_scores = scored(two_sided, "mean")
    slope, intercept = np.polyfit(complexity["A"], preset_scores["A"], 1)

    def standardised(values):
        return {n: (v - values["A"].mean()) / values["A"].std() for n, v in values.items()}

    zs, zc = standardised(preset_scores), standardised(complexity)
    out = {
        "preset: two-sided map, mean": preset_scores,
        "two-sided map, max + top-1% mean": scored(two_sided, "max_plus_top1"),
        "two-sided map, energy (log-mean-exp)": {n: np.log(np.mean(np.exp(m.reshape(len(m), -1)), 1))
                                                 for n, m in two_sided.items()},
        "t^2-weighted z-scores, mean": scored(mapped("weighted"), "mean"),
        "two-sided map of the early times (t <= 1/2), mean": scored(mapped("two_sided", time_index=early), "mean"),
        "two-sided map of the late times (t > 1/2), mean": scored(mapped("two_sided", time_index=~early), "mean"),
        f"per-pixel Mahalanobis over the T log-mismatches (shrinkage {SHRINKAGE}), mean":
            {n: per_pixel_mahalanobis(logs["A"], logs[n]).mean((1, 2)) for n in "BV"},
        "image Gaussian over the T mean log z-scores":
            dict(zip("BV", (gaussian_distance(z["A"].mean((2, 3)), z[n].mean((2, 3))) for n in "BV"))),
        "PNG length alone": complexity,
        "preset minus its PNG-length trend on normals": {n: preset_scores[n] - (intercept + slope * complexity[n])
                                                         for n in preset_scores},
        "preset + |z| of PNG length": {n: zs[n] + np.abs(zc[n]) for n in zs},
    }
    normal_r = float(np.corrcoef(preset_scores["A"], complexity["A"])[0, 1])
    return {name: (s["B"], s["V"]) for name, s in out.items()}, normal_r


def path_study(delta, times, preset, total: int) -> dict:
    """{(aggregate, K): [AUROC of each disjoint group of K of the `total` paths]} of the
    preset's rule with its aggregate replaced, from delta {A, B, V: [N, T, total, H, W]}."""
    import jax.numpy as jnp

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import heat_maps, per_time_maps, time_weights
    from fmjax.methods.maps import image_score

    times = jnp.asarray(times)
    weights = time_weights(times, "t2")
    labels = np.r_[np.zeros(len(delta["B"])), np.ones(len(delta["V"]))]
    out = {}
    for k in (4, 8, 16):
        for aggregate in ("mean", "median", "quantile:0.5", "quantile:0.25"):
            for group in range(total // k):
                d = {n: jnp.asarray(v[:, :, group * k:(group + 1) * k]) for n, v in delta.items()}
                stats = norm.fit_stats(per_time_maps(d["A"], aggregate, preset.smooth_sigma), weights, preset.normalize)
                scores = [np.asarray(image_score(heat_maps(d[n], times, aggregate, "t2", preset.smooth_sigma,
                                                           preset.normalize, preset.map_rule, stats), preset.image_score))
                          for n in "BV"]
                out.setdefault((aggregate, k), []).append(
                    metrics.image_metrics(np.concatenate(scores), labels)["image_auroc"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", help="folder of the trained runs (default: OUT/runs; select_settings' runs are reused)")
    p.add_argument("--aligned", default="fashion_mnist:0,digits:0,digits:1")
    p.add_argument("--num-times", type=int, default=8)
    p.add_argument("--others", type=int, default=300, help="other-class images per set")
    p.add_argument("--path-seeds", type=int, default=3, help="independent draws of the noise paths per set")
    p.add_argument("--path-study", type=int, default=0, metavar="TOTAL",
                   help="draw TOTAL paths once and compare groups of 4, 8 and 16 of them instead")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    args = p.parse_args()
    from fmjax.app import launch

    launch.start()
    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch.settings import PRESETS

    args.runs = args.runs or os.path.join(args.out, "runs")
    args.texture_steps, args.repeats = 0, 0
    os.makedirs(args.out, exist_ok=True)
    table, correlations = {}, {}
    for item in filter(None, args.aligned.split(",")):
        source, _, value = item.partition(":")
        if source == "digits":
            name, spec, category = f"digits_{value}", digits_folder(os.path.join(args.out, "digits"), int(value)), \
                f"digit_{value}"
        else:
            name, spec, category = f"fashion_mnist_{value}", item, None
        run, sets, _, kind, _, _ = validation_data(name, spec, category, "aligned", args)
        if kind != "aligned":
            raise SystemExit(f"{name} resolved to the {kind} preset, not aligned")
        if args.path_study:
            delta, times = stored_mismatch(run, sets, args.path_study, args.num_times, seed=5)
            study = path_study(delta, times, PRESETS["aligned"], args.path_study)
            lines = [f"# More paths? {name}, validation image AUROC of the aligned rule", "",
                     f"Command: `{command_line()}`", "", "| aggregate | K | each disjoint group | mean |",
                     "|---|---|---|---|"]
            lines += [f"| {a} | {k} | " + ", ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |"
                      for (a, k), values in study.items()]
            with open(os.path.join(args.out, "paths.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
            with open(os.path.join(args.out, "paths.json"), "w") as f:
                json.dump([{"aggregate": a, "num_paths": k, "auroc": v} for (a, k), v in study.items()], f, indent=1)
            print("\n".join(lines))
            continue
        for seed in range(args.path_seeds):
            delta, times = stored_mismatch(run, sets, PRESETS["aligned"].num_paths, args.num_times, seed=seed)
            scores, r = variant_scores(delta, times, sets, PRESETS["aligned"])
            correlations.setdefault(name, []).append(r)
            for variant, (normal, anomalous) in scores.items():
                labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
                table.setdefault(variant, {}).setdefault(name, []).append(
                    metrics.image_metrics(np.r_[normal, anomalous], labels)["image_auroc"])
            print(name, seed, {v: round(a[name][-1], 4) for v, a in table.items()}, flush=True)
    if args.path_study:
        return
    names = list(correlations)
    lines = ["# Image scores for one-class sets, on validation data", "", f"Command: `{command_line()}`", "",
             "Validation image AUROC (B: held-out normals, V: other classes' training images; A fits every "
             f"statistic): mean over {args.path_seeds} draws of the noise paths [lowest - highest].", "",
             "| variant | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for variant, per_set in table.items():
        cells = [f"{np.mean(per_set[n]):.3f} [{min(per_set[n]):.3f} - {max(per_set[n]):.3f}]" for n in names]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {np.mean([np.mean(per_set[n]) for n in names]):.3f} |")
    lines += ["", "Correlation of the preset's score with PNG length on the normals A (mean over draws): " +
              ", ".join(f"{n} {np.mean(r):+.2f}" for n, r in correlations.items())]
    with open(os.path.join(args.out, "image_scores.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "image_scores.json"), "w") as f:
        json.dump({"auroc": table, "normal_correlation_with_png_length": correlations}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
