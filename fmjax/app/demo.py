"""`fmjax demo`: train and evaluate Flow Mismatching on the embedded textures (synthetic
defects on real photos), one model per texture, and print the metrics table. To stay
within minutes on a laptop CPU it trains 400 steps (`--steps`) on 32x32 patches (`--patch`)
of 200 crops per texture (`--train-crops`); `fmjax train` uses the preset's length, whole
images and 256 crops."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from fmjax import data as data_lib
from fmjax.app.evaluate import COLUMNS, evaluate_run, metrics_table
from fmjax.app.train import resolve_auto, train_run
from fmjax.config import AUTO, build
from fmjax.errors import ConfigError, DataError
from fmjax.files import write_json, write_text_atomic
from fmjax.methods.batches import scoring_progress

__all__ = ["main"]


def main(args) -> None:
    import jax

    from fmjax.data import textures

    names = [n.strip() for n in args.textures.split(",") if n.strip()]
    for name in names:
        if name not in textures.TEXTURES:
            raise DataError(f"unknown texture {name!r} (known: {', '.join(textures.TEXTURES)})")
    flags = (("--steps", "train.steps", args.steps), ("--patch", "train.patch_size", args.patch),
             ("--train-crops", "textures.num_train", args.train_crops))
    for flag, _, value in flags:
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (0: the preset's), got {value}")
    budget = [f"{key}={value}" for _, key, value in flags if value]
    overrides = budget + list(args.set)
    config = None if args.preset == AUTO else build(args.preset, "flow_mismatch", overrides)
    # the three textures share shapes: later ones reuse the compiled programs
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.out, ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    rows = []
    for name in names:
        start = time.perf_counter()
        run_dir = os.path.join(args.out, name)
        spec, data, preset = f"textures:{name}", None, args.preset
        if config is None:
            run_config, data, preset = resolve_auto(spec, None, "flow_mismatch", overrides)
        else:
            run_config = config
        print(f"== {name}: training ({run_config.train.steps} steps, preset {preset}) ...", flush=True)
        run = train_run(run_config, spec, None, run_dir, resume=os.path.isdir(run_dir),
                        progress=not args.no_progress, data=data)
        dataset = data_lib.load(f"textures:{name}", None, run.config.data, run.config.textures)
        with scoring_progress(f"scoring {name}", not args.no_progress and sys.stderr.isatty()):
            result = evaluate_run(run, dataset, pictures_out=os.path.join(run_dir, "pictures"))
        result["seconds"] = time.perf_counter() - start
        rows.append(result)
        print(f"   image AUROC {result['image_auroc']:.3f}  pixel AUROC {result['pixel_auroc']:.3f}  "
              f"AUPRO {result['aupro']:.3f}  ({result['seconds']:.0f} s)", flush=True)
    mean = {"category": "mean"}
    for key in COLUMNS[1:]:
        if all(isinstance(r.get(key), float) for r in rows):  # metrics and seconds, not call counts
            mean[key] = float(np.mean([r[key] for r in rows]))
    table = metrics_table(rows + [mean])
    print("\nFlow Mismatching on synthetic defects on real textures (one model per texture)\n" + table)
    write_json(os.path.join(args.out, "demo_results.json"), rows)
    write_text_atomic(os.path.join(args.out, "demo_results.md"), table + "\n")
    print(f"heat-map pictures -> {os.path.join(args.out, '<texture>', 'pictures')}")
