"""Shared driver for the per-category tables: train (or reuse) one run per category,
evaluate it with the one scoring path, and write markdown + CSV + JSON."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import numpy as np

COLUMNS = ["category", "preset", "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
           "aupro", "image_f1_at_threshold", "train_seconds", "eval_seconds"]


def command_line(argv=None) -> str:
    """The command that ran this script, as a results file records it: `python
    experiments/NAME.py ARGS`, paths under the working folder relative to it and other
    absolute paths by their last component (a results file names no machine's folders)."""
    argv = sys.argv if argv is None else argv

    def shown(arg: str) -> str:
        key, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if os.path.isabs(value):
            relative = os.path.relpath(value)
            value = relative if not relative.startswith("..") else os.path.basename(value.rstrip("/"))
        return f"{key}{eq}{value}"

    script = "experiments/" + os.path.basename(argv[0])
    return " ".join(["python", script] + [shown(a) for a in argv[1:]])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="auto", help="auto (default: chosen per category from its training "
                                                      "images) or a preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--categories", help="comma-separated subset (default: all)")
    p.add_argument("--out", required=True, help="folder for runs and tables")
    p.add_argument("--resume", action="store_true", help="keep categories already evaluated in --out")
    return p


def run_table(spec_of, categories, args, title: str) -> list[dict]:
    """spec_of(category) -> (data spec, category or None). Returns the rows (plus mean)."""
    from fmjax import data as data_lib
    from fmjax.app.evaluate import evaluate_run
    from fmjax.app.train import resolve_auto, train_run
    from fmjax.config import AUTO, build
    from fmjax.files import write_json
    from fmjax.methods.batches import scoring_progress

    config = None if args.preset == AUTO else build(args.preset, "flow_mismatch", args.set)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.json")
    done = {r["category"]: r for r in json.load(open(rows_path))} if args.resume and os.path.exists(rows_path) else {}
    rows = []
    for category in categories:
        if category in done:
            rows.append(done[category])
            continue
        spec, cat = spec_of(category)
        run_dir = os.path.join(args.out, "runs", category)
        start = time.perf_counter()
        run_config, data = config, None
        if config is None:
            run_config, data, _ = resolve_auto(spec, cat, "flow_mismatch", args.set)
        run = train_run(run_config, spec, cat, run_dir, resume=os.path.isdir(run_dir), progress=False, data=data)
        train_s = time.perf_counter() - start
        dataset = data_lib.load(spec, cat, run.config.data, run.config.textures)
        if getattr(args, "test_limit", 0):
            dataset = dataclasses.replace(dataset, test=data_lib.stratified_subset(dataset.test, args.test_limit))
        start = time.perf_counter()
        with scoring_progress(f"scoring {category}", sys.stderr.isatty()):
            result = evaluate_run(run, dataset)
        result.update(category=category, preset=run.config.preset, train_seconds=train_s, eval_seconds=time.perf_counter() - start)
        rows.append(result)
        write_json(rows_path, rows)
        print(f"{category}: image AUROC {result['image_auroc']:.3f} pixel AUROC {result['pixel_auroc']:.3f}",
              flush=True)
    write_table(rows, args.out, title, config)
    return rows


def write_report(out: str, stem: str, results, lines: list[str]) -> None:
    """An experiment's results as OUT/<stem>.json and its report `lines` as OUT/<stem>.md
    (also printed)."""
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_table(rows, out: str, title: str, config) -> str:
    from fmjax.eval.viz import markdown_table

    mean = {"category": "mean"}
    for key in COLUMNS[1:]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not np.isnan(r[key])]
        if values or key != "preset":
            mean[key] = float(np.mean(values)) if values else float("nan")  # nan: no row has it (image-level sets)
    table = markdown_table(rows + [mean], COLUMNS)
    text = f"# {title}\n\nCommand: `{command_line()}`\n\n{table}\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + [mean])
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"rows": rows, "mean": mean, "config": json.loads(config.to_json()) if config else "auto: each run's config.json"}, f, indent=2)
    print(text)
    return text
