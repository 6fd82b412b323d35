"""Path-aggregation study: run the network once per test set at the largest (K, T), keep
the mismatch tensor on disk, then evaluate a grid of K subsets, T subsets, aggregation
rules, time weights, smoothing and image-score rules without calling the network again.

Command (after `fmjax train --data textures:brick --out runs/brick`):
    python experiments/path_aggregation.py --run runs/brick --out results/paths_brick
Writes results/paths_brick/{delta.npy, table.md, table.csv, auroc_vs_K.png, auroc_vs_T.png}.
Time grids: a T subset must reuse computed times, so the network runs at T_max with
T_max + 1 = lcm(T + 1 for T in --T); the default --T 1,3,7,15 needs T_max = 15.
Expected run time on a 2-core CPU with the small preset: about 4 minutes of network
passes for 40 test images at K=16, T=15, then a few seconds for the whole default grid
(1,152 rows, fmjax.methods.flow_mismatch.study: vectorised and jitted; --serial also runs
the old one-row-at-a-time loop, minutes, and checks that the rows agree).
--reuse-delta skips the network passes when OUT/delta.npy is already there.
Every row uses the paper's map rule (score.normalize = none, map_rule = weighted), whatever
the run's: the normalised rules need statistics of held-out normals the study does not store.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import time

import numpy as np


def compute_delta(run, images, k_max, t_max, path, float16, batch):
    """Writes the mismatch tensor [N, T_max, K_max, H, W] to `path` (memmap), in image batches."""
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


def grid_rules(base, k_values, t_values, aggregates, weights, sigmas, image_rules) -> list:
    """The grid's rules (fmjax.methods.flow_mismatch.study.rule_grid)."""
    from fmjax.methods.flow_mismatch import study

    return study.rule_grid(base, num_paths=k_values, num_times=t_values, aggregate=aggregates, time_weight=weights,
                           smooth_sigma=sigmas, image_score=image_rules)


def evaluate_rules(rules, delta, times, test, serial=False) -> list:
    """The rules' rows: one vectorised pass (its compiled programs made anew, so that every
    timing includes them), or with serial=True the reference loop (the scorer's functions
    one row at a time)."""
    from fmjax.methods.flow_mismatch import study

    study._maps_program.cache_clear()
    study._scores_program.cache_clear()
    evaluate = study.serial_rows if serial else study.evaluate_rules
    rows = evaluate(delta, times, rules, test.labels, test.masks)
    return [dict(r, K=r["num_paths"], T=r["num_times"]) for r in rows]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def line_plot(path, series, xlabel, ylabel):
    """PNG line plot of series = {name: [(x, y), ...]}: with matplotlib (fmjax[plots]) a
    figure with real axes (fmjax.eval.plots), else a small PIL drawing."""
    from PIL import Image, ImageDraw

    from fmjax.eval import plots

    if plots.write_line_plot(path, series, xlabel, ylabel):
        return

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
    p.add_argument("--serial", action="store_true",
                   help="also run the reference loop (one row at a time), time it and check the rows agree")
    p.add_argument("--reference-sort", choices=("network", "jnp"), default="network",
                   help="how the reference loop sorts the K paths: the sorting network the library uses, or "
                        "jnp.sort, as the loop did before the network (its speed is the studies' baseline)")
    p.add_argument("--reuse-delta", action="store_true", help="reuse OUT/delta.npy from an earlier run")
    args = p.parse_args()

    from fmjax.app import launch

    launch.start()
    from fmjax import data as data_lib, runs
    from fmjax.eval.viz import markdown_table
    from fmjax.methods.flow_mismatch.scorer import interior_times
    from fmjax.methods.flow_mismatch.study import time_grid

    run = runs.load_run(args.run)
    spec = args.data or run.data_info["spec"]
    category = args.category or (None if args.data else run.data_info.get("category"))
    test = data_lib.load(spec, None if spec.startswith("textures:") else category, run.config.data,
                         run.config.textures).test
    k_values = [int(k) for k in args.K.split(",")]
    t_values = [int(t) for t in args.T.split(",")]
    t_max, _ = time_grid(t_values)
    os.makedirs(args.out, exist_ok=True)
    delta_path = os.path.join(args.out, "delta.npy")
    start = time.perf_counter()
    if args.reuse_delta and os.path.exists(delta_path):
        times = interior_times(t_max)
    else:
        times = compute_delta(run, test.images, max(k_values), t_max, delta_path, args.float16, args.batch)
    network_s = time.perf_counter() - start
    delta = np.load(delta_path, mmap_mode="r")
    if delta.shape[:3] != (len(test), t_max, max(k_values)):
        raise SystemExit(f"path_aggregation: {delta_path} holds {delta.shape[:3]}, not (N, T, K) = "
                         f"{(len(test), t_max, max(k_values))}: run without --reuse-delta")
    # the study covers the paper's map rule; normalised rules need statistics of held-out normals
    base = dataclasses.replace(run.config.score, normalize="none", map_rule="weighted")
    rules = grid_rules(base, k_values, t_values, args.aggregates.split(","), args.weights.split(","),
                       [float(s) for s in args.sigmas.split(",")], args.image_scores.split(","))
    rows, grid_s = timed(evaluate_rules, rules, delta, times, test)
    serial_note = ""
    if args.serial:
        from fmjax.methods.flow_mismatch import order

        order.MAX_NETWORK = order.MAX_NETWORK if args.reference_sort == "network" else 0  # 0: always jnp.sort
        # the loop in quarters, the vectorised pass again after each: on a shared machine both
        # see the same load, and the ratio is to the passes' mean
        reference, serial_s, grid_runs = [], 0.0, [grid_s]
        for part in np.array_split(np.arange(len(rules)), 4):
            part_rows, seconds = timed(evaluate_rules, [rules[i] for i in part], delta, times, test, serial=True)
            reference += part_rows
            serial_s += seconds
            grid_runs.append(timed(evaluate_rules, rules, delta, times, test)[1])
        worst = max((abs(a[k] - b[k]) for a, b in zip(rows, reference) for k in a
                     if isinstance(a[k], float) and not (np.isnan(a[k]) and np.isnan(b[k]))), default=0.0)
        mean_grid = float(np.mean(grid_runs))
        serial_note = (f"; the vectorised pass took {min(grid_runs):.1f}-{max(grid_runs):.1f} s in {len(grid_runs)} "
                       f"runs (compiles included), the reference loop (one row at a time, K sorted by "
                       f"{args.reference_sort}) {serial_s:.1f} s in quarters between them: "
                       f"{serial_s / mean_grid:.0f}x the mean pass; largest metric difference {worst:.1e}")
    cols = ["K", "T", "aggregate", "time_weight", "smooth_sigma", "image_score", "image_auroc", "image_ap",
            "pixel_auroc", "pixel_ap", "aupro"]
    network = "reused" if args.reuse_delta and network_s < 1 else f"{network_s:.1f} s"
    text = (f"# Path aggregation study ({spec})\n\nthe paper's map rule (score.normalize none, weighted); "
            f"network passes at K={max(k_values)}, T={t_max}: "
            f"{network}; {len(rows)} grid rows evaluated in {grid_s:.1f} s{serial_note}\n\n"
            + markdown_table(rows, cols) + "\n")
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
    print(f"network {network}, grid {grid_s:.1f} s for {len(rows)} rows{serial_note} -> {args.out}")


if __name__ == "__main__":
    main()
