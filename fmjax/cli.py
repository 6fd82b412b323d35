"""`fmjax train | evaluate | predict | bench | demo | info` (the CLI contract of the README)."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmjax", description="Flow Mismatching anomaly detection in JAX.")
    p.add_argument("--devices", type=int, default=0,
                   help="CPU only: host devices to use (default: one per core; 1 turns multi-device off)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on normal images")
    t.add_argument("--data", required=True, help="textures:NAME | folder:ROOT | mvtec:ROOT")
    t.add_argument("--category", help="category folder under ROOT (folder/mvtec/visa data); "
                                        "'all' trains one model on every category")
    t.add_argument("--out", required=True, help="run folder to write")
    t.add_argument("--preset", default="small", help="tiny | small | paper (default: small)")
    t.add_argument("--method", default="flow_mismatch",
                   help="flow_mismatch | radar | recon (default: flow_mismatch; recon scores a flow model "
                        "by reconstruction)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh",
                   help="data parallelism: jit over a device mesh (default) or pmap; same results")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="score a test split, print and save metrics")
    e.add_argument("--run", required=True)
    e.add_argument("--data", help="default: the data the run was trained on")
    e.add_argument("--category")
    e.add_argument("--maps-out", help="write float32 TIFF maps (MVTec evaluation layout)")
    e.add_argument("--pictures-out", help="write heat-map overlay PNGs")
    e.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE",
                   help="scoring override (score.*, radar.* or recon.*, e.g. score.num_paths=32)")

    r = sub.add_parser("predict", help="score image files")
    r.add_argument("--run", required=True)
    r.add_argument("--input", required=True, help="an image file or a folder of images")
    r.add_argument("--out", required=True)
    r.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE")

    d = sub.add_parser("demo", help="train and evaluate on the embedded textures")
    d.add_argument("--out", default="fmjax_demo", help="folder for runs and pictures (default: fmjax_demo)")
    d.add_argument("--preset", default="small")
    d.add_argument("--textures", default="brick,grass,gravel")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bench", help="scoring and training throughput against a plain loop, a plain forward "
                                     "pass and the matmul peak; memory")
    b.add_argument("--quick", action="store_true", help="reduced set, same keys (2-3 minutes on 2 CPU cores)")
    b.add_argument("--json", help="also write the figures as JSON here")
    sub.add_parser("info", help="versions, devices and the memory allocator this process runs with")
    return p


def _use_cpu_cores(devices: int) -> None:
    """One XLA host device per core (XLA:CPU runs one device on about one core).
    Must run before jax is imported; a no-op when XLA_FLAGS already sets it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return
    count = devices or os.cpu_count() or 1
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


# settings of the trained network itself: fixed once trained
_RADAR_TRAINING = ("radar.schedule", "radar.num_steps", "radar.beta_start", "radar.beta_end")


def _score_only(overrides):
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(("score.", "radar.", "recon.")) or key in _RADAR_TRAINING:
            raise _user_error(f"--set {item!r}: only scoring settings (score.*, recon.*, radar.* but the noise "
                              f"schedule) can change after training")
    return overrides


def _user_error(message):
    from fmjax.config import ConfigError

    return ConfigError(message)


def _build_config(preset_name, method, overrides):
    from fmjax.config import apply_overrides, preset

    return apply_overrides(preset(preset_name), [f"method={method}"] + list(overrides))


def cmd_train(args):
    from fmjax import runs

    config = _build_config(args.preset, args.method, args.set)
    run = runs.train_run(config, args.data, args.category, args.out, resume=args.resume,
                         progress=not args.no_progress, use_pmap=args.parallel == "pmap")
    print(f"trained {run.config.train.steps} steps -> {args.out}")


def cmd_evaluate(args):
    from fmjax import data as data_lib, runs

    run = runs.load_run(args.run, _score_only(args.set))
    spec = args.data or run.data_info.get("spec")
    if not spec:
        raise runs.RunError(f"{args.run}/data.json is missing: pass --data")
    category = args.category or (None if args.data else run.data_info.get("category"))
    if spec.startswith("textures:"):
        category = None
    if category == "all":
        result = runs.evaluate_all(run, spec, maps_out=args.maps_out, pictures_out=args.pictures_out)
        print(_metrics_table(result["per_category"] + [result]))
        print(f"metrics -> {os.path.join(args.run, 'metrics.json')}")
        return
    trained_on = run.data_info.get("categories") or []
    dataset = data_lib.load(spec, category, run.config.data)
    result = runs.evaluate_run(run, dataset, maps_out=args.maps_out, pictures_out=args.pictures_out,
                               class_id=trained_on.index(category) if category in trained_on else 0)
    print(_metrics_table([result]))
    print(f"metrics -> {os.path.join(args.run, 'metrics.json')}")


def cmd_predict(args):
    from fmjax import runs

    run = runs.load_run(args.run, _score_only(args.set))
    rows = runs.predict(run, args.input, args.out)
    flagged = sum(1 for r in rows if r["anomalous"] == 1)
    rule = "the Isolation Forest" if run.config.method == "radar" else "the normal-image threshold"
    print(f"scored {len(rows)} images ({flagged} anomalous by {rule}) -> {args.out}")


COLUMNS = ["category", "image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "radar_f1",
           "network_calls_per_image", "seconds"]


def _metrics_table(rows):
    from fmjax.viz import markdown_table

    return markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])


def cmd_demo(args):
    import numpy as np

    from fmjax import data as data_lib, runs
    from fmjax.data import textures

    names = [n.strip() for n in args.textures.split(",") if n.strip()]
    for name in names:
        if name not in textures.TEXTURES:
            raise data_lib.DataError(f"unknown texture {name!r} (known: {', '.join(textures.TEXTURES)})")
    config = _build_config(args.preset, "flow_mismatch", args.set)
    import jax

    # the three textures share shapes: later ones reuse the compiled programs
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.out, ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    rows = []
    for name in names:
        start = time.perf_counter()
        run_dir = os.path.join(args.out, name)
        print(f"== {name}: training ({config.train.steps} steps) ...", flush=True)
        run = runs.train_run(config, f"textures:{name}", None, run_dir, resume=os.path.isdir(run_dir),
                             progress=not args.no_progress)
        dataset = data_lib.load(f"textures:{name}", None, run.config.data)
        result = runs.evaluate_run(run, dataset, pictures_out=os.path.join(run_dir, "pictures"))
        result["seconds"] = time.perf_counter() - start
        rows.append(result)
        print(f"   image AUROC {result['image_auroc']:.3f}  pixel AUROC {result['pixel_auroc']:.3f}  "
              f"AUPRO {result['aupro']:.3f}  ({result['seconds']:.0f} s)", flush=True)
    mean = {"category": "mean"}
    for key in COLUMNS[1:]:
        if all(isinstance(r.get(key), float) for r in rows):  # metrics and seconds, not call counts
            mean[key] = float(np.mean([r[key] for r in rows]))
    table = _metrics_table(rows + [mean])
    print("\nFlow Mismatching on synthetic defects on real textures (one model per texture)\n" + table)
    runs.write_json(os.path.join(args.out, "demo_results.json"), rows)
    with open(os.path.join(args.out, "demo_results.md"), "w") as f:
        f.write(table + "\n")
    print(f"heat-map pictures -> {os.path.join(args.out, '<texture>', 'pictures')}")


def cmd_bench(args):
    from fmjax import bench, runs

    start = time.perf_counter()
    result = bench.run(quick=args.quick, log=lambda line: print(line, flush=True))
    result["wall_s"] = time.perf_counter() - start
    print(bench.report(result))
    print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        runs.write_json(args.json, result)


def cmd_info(args):
    import flax
    import jax
    import jaxlib

    import fmjax
    from fmjax import allocator

    devices = jax.local_devices()
    print(f"fmjax {fmjax.__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")
    print(f"backend {jax.default_backend()}: {len(devices)} device(s), {devices[0].device_kind}")
    print(f"allocator {allocator.loaded_allocator()}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo,
            "bench": cmd_bench, "info": cmd_info}


def main(argv=None) -> int:
    """The command line; `argv` None: this process's own (which may restart it with
    tcmalloc, `fmjax/allocator.py`)."""
    args = _parser().parse_args(argv)
    if argv is None:
        from fmjax import allocator

        allocator.use_tcmalloc()
    _use_cpu_cores(args.devices)
    from fmjax import parallel

    parallel.maybe_initialize_distributed()  # a no-op unless a multi-host launch is detected
    from fmjax.config import ConfigError
    from fmjax.data import DataError
    from fmjax.mismatch import ScoreRuleError
    from fmjax.runs import RunError
    from fmjax.train import TrainError

    try:
        COMMANDS[args.command](args)
    except (ConfigError, DataError, RunError, TrainError, ScoreRuleError) as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        print(f"fmjax {args.command}: error: {first_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmjax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
