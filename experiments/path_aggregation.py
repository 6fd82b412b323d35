"""Path-aggregation study: run the network once per test set at the largest (K, T), keep
the mismatch tensor on disk, then evaluate a grid of K subsets, T subsets, aggregation
rules, time weights, smoothing and image-score rules without calling the network again.

Command (after `fmjax train --data textures:brick --out runs/brick`):
    python experiments/path_aggregation.py --run runs/brick --out results/paths_brick
Writes results/paths_brick/{delta.npy, table.md, table.csv, auroc_vs_K.png, auroc_vs_T.png}.
Time grids: a T subset must reuse computed times, so the network runs at T_max with
T_max + 1 = lcm(T + 1 for T in --T); the default --T 1,3,7,15 needs T_max = 15.
Expected run time on a 2-core CPU with the small preset: about 4 minutes of network
passes for 40 test images at K=16, T=15, then seconds per grid row.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import time

import numpy as np


def time_grid(t_values):
    """T_max with every T in t_values a sub-grid, and for each T the indices into T_max's times."""
    t_max = math.lcm(*[t + 1 for t in t_values]) - 1
    index = {t: [j * (t_max + 1) // (t + 1) - 1 for j in range(1, t + 1)] for t in t_values}
    return t_max, index


def compute_delta(run, images, k_max, t_max, path, float16, batch):
    """Writes the mismatch tensor [N, T_max, K_max, H, W] to `path` (memmap), in image batches."""
    import dataclasses

    from fmjax.methods.flow_mismatch.scorer import Scorer
    from fmjax.nets.unet import build_model

    score_cfg = dataclasses.replace(run.config.score, num_paths=k_max, num_times=t_max)
    _, apply_fn = build_model(run.config.net, run.image_shape)
    scorer = Scorer(apply_fn, score_cfg, run.image_shape)
    n, (h, w) = len(images), run.image_shape[:2]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16 if float16 else np.float32,
                                    shape=(n, t_max, k_max, h, w))
    for start in range(0, n, batch):
        out[start:start + batch] = scorer.delta(run.params, images[start:start + batch])
    out.flush()
    return np.asarray(scorer.times)


def evaluate_grid(delta, times, t_index, test, k_values, t_values, aggregates, weights, sigmas, image_rules):
    import jax.numpy as jnp

    from fmjax.errors import ScoreRuleError
    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch.scorer import heat_maps
    from fmjax.methods.flow_mismatch.settings import parse_aggregate
    from fmjax.methods.maps import image_score

    rows = []
    for k, t in itertools.product(k_values, t_values):
        sub = np.asarray(delta[:, t_index[t], :k], np.float32)
        for agg, weight, sigma in itertools.product(aggregates, weights, sigmas):
            try:
                parse_aggregate(agg, k)
            except ScoreRuleError:
                continue
            maps = heat_maps(jnp.asarray(sub), jnp.asarray(times[t_index[t]]), agg, weight, sigma)
            pixel = metrics.pixel_metrics(np.asarray(maps), test.masks)
            for rule in image_rules:
                scores = np.asarray(image_score(maps, rule))
                image = metrics.image_metrics(scores, test.labels)
                rows.append({"K": k, "T": t, "aggregate": agg, "time_weight": weight, "smooth_sigma": sigma,
                             "image_score": rule, **image, **pixel})
    return rows


def line_plot(path, series, xlabel, ylabel):
    """Tiny PNG line plot (no plotting dependency): series = {name: [(x, y), ...]}."""
    from PIL import Image, ImageDraw

    w, h, m = 480, 320, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({x for s in series.values() for x, _ in s})
    ys = [y for s in series.values() for _, y in s if np.isfinite(y)]
    lo, hi = (min(ys), max(ys)) if ys else (0, 1)
    hi = hi if hi > lo else lo + 1e-3
    px = lambda x: m + (xs.index(x) / max(len(xs) - 1, 1)) * (w - 2 * m)
    py = lambda y: h - m - (y - lo) / (hi - lo) * (h - 2 * m)
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for x in xs:
        d.text((px(x) - 4, h - m + 4), str(x), fill="black")
    d.text((w // 2 - 20, h - 16), xlabel, fill="black")
    d.text((4, 4), f"{ylabel} [{lo:.3f}, {hi:.3f}]", fill="black")
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        c = colours[i % len(colours)]
        d.line([(px(x), py(y)) for x, y in pts], fill=c, width=2)
        d.text((w - m - 120, m + 12 * i), name, fill=c)
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="default: the run's data")
    p.add_argument("--category")
    p.add_argument("--K", default="1,2,4,8,16")
    p.add_argument("--T", default="1,3,7,15")
    p.add_argument("--aggregates", default="min,rank:2,median,mean,trimmed:0.25")
    p.add_argument("--weights", default="t2,none")
    p.add_argument("--sigmas", default="0,2")
    p.add_argument("--image-scores", default="max_plus_top1,max,topk_mean:0.01")
    p.add_argument("--float16", action="store_true", help="store the tensor as float16 (half the disk)")
    p.add_argument("--batch", type=int, default=8, help="images per network pass")
    args = p.parse_args()

    from fmjax.app import launch

    launch.start()
    from fmjax import data as data_lib, runs
    from fmjax.eval.viz import markdown_table

    run = runs.load_run(args.run)
    spec = args.data or run.data_info["spec"]
    category = args.category or (None if args.data else run.data_info.get("category"))
    test = data_lib.load(spec, None if spec.startswith("textures:") else category, run.config.data,
                         run.config.textures).test
    k_values = [int(k) for k in args.K.split(",")]
    t_values = [int(t) for t in args.T.split(",")]
    t_max, t_index = time_grid(t_values)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    times = compute_delta(run, test.images, max(k_values), t_max, os.path.join(args.out, "delta.npy"),
                          args.float16, args.batch)
    network_s = time.perf_counter() - start
    delta = np.load(os.path.join(args.out, "delta.npy"), mmap_mode="r")
    start = time.perf_counter()
    rows = evaluate_grid(delta, times, t_index, test, k_values, t_values, args.aggregates.split(","),
                         args.weights.split(","), [float(s) for s in args.sigmas.split(",")],
                         args.image_scores.split(","))
    grid_s = time.perf_counter() - start
    cols = ["K", "T", "aggregate", "time_weight", "smooth_sigma", "image_score", "image_auroc", "image_ap",
            "pixel_auroc", "pixel_ap", "aupro"]
    text = (f"# Path aggregation study ({spec})\n\nnetwork passes at K={max(k_values)}, T={t_max}: "
            f"{network_s:.1f} s; {len(rows)} grid rows re-aggregated in {grid_s:.1f} s "
            f"({grid_s / max(len(rows), 1):.2f} s per row)\n\n" + markdown_table(rows, cols) + "\n")
    open(os.path.join(args.out, "table.md"), "w").write(text)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    base = dict(aggregate=args.aggregates.split(",")[0], time_weight="t2", smooth_sigma=float(args.sigmas.split(",")[-1]),
                image_score="max_plus_top1")
    pick = lambda r: all(r[k] == v for k, v in base.items())
    for axis, other, fixed in (("K", "T", max(t_values)), ("T", "K", max(k_values))):
        series = {m: [(r[axis], r[m]) for r in rows if pick(r) and r[other] == fixed]
                  for m in ("image_auroc", "pixel_auroc")}
        line_plot(os.path.join(args.out, f"auroc_vs_{axis}.png"), series, axis, "AUROC")
    print(text[:2000])
    print(f"network {network_s:.1f} s, re-aggregation {grid_s:.1f} s for {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
