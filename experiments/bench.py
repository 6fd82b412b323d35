"""The full `fmjax bench` sweep: scoring at K x T in {8x8, 16x30} for the small and paper
presets at 64x64 and 128x128, training per preset, 1 device against all, the matmul peak.

Command:
    python experiments/bench.py --out results/bench [--presets small,paper] [--sizes 64,128]
        [--kt 8x8,16x30] [--train small:64,small:128,paper:64]
Writes OUT/bench.json (the `fmjax bench --json` keys plus every case) and OUT/bench.md.
Expected run time on a 2-core CPU: over an hour for the default set, most of it the paper
preset (11.3 GFLOP per network evaluation at 64x64, 49.6 at 128x128, from XLA's cost
analysis; the CPU reaches tens of GFLOP/s). `--presets small --sizes 64 --train small:64`
is the quick set of `fmjax bench --quick` (2-3 minutes). On an accelerator the default
set takes minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import command_line  # noqa: E402


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--presets", default="small,paper")
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--kt", default="8x8,16x30", help="K x T pairs")
    p.add_argument("--train", default="small:64,small:128,paper:64", help="preset:size training cases")
    p.add_argument("--images", type=int, default=0,
                   help="images per scoring case (default: 2 at K*T <= 64, else 1)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    from fmjax.app import launch

    launch.start()  # before jax is imported
    from fmjax.app import bench
    from fmjax.files import write_json

    kt = [tuple(int(v) for v in pair.split("x")) for pair in args.kt.split(",")]
    scoring = [(p, int(s), k, t, args.images or (2 if k * t <= 64 else 1))
               for p in args.presets.split(",") for s in args.sizes.split(",") for k, t in kt]
    training = [(item.split(":")[0], int(item.split(":")[1])) for item in args.train.split(",")]
    start = time.perf_counter()
    result = bench.run(quick=False, log=lambda line: print(line, flush=True), scoring_cases=scoring,
                       training_cases=training)
    result["wall_s"] = time.perf_counter() - start
    text = bench.report(result)
    print(text + f"\nwall time {result['wall_s']:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "bench.json"), result)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"Command: `{command_line()}`\n\n{text}\n\nWall time {result['wall_s']:.0f} s.\n")


if __name__ == "__main__":
    main()
