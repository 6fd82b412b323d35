"""The command line: `fmjax train | evaluate | predict | calibrate | export | config | demo |
bench | info`.

Each command is a module of this package with `main(args)`; `main` here parses the
arguments, starts the process through `fmjax.app.launch.start` (allocator, devices,
multi-host), then runs the command. An FmjaxError or OSError prints one line and exits
with code 2; any other error (a bug) prints one line and exits with code 1; `--debug` (or
FMJAX_DEBUG=1) shows the traceback instead. fmjax's warnings print as one line each.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "train": "train a model on normal images",
    "evaluate": "score a test split, print and save metrics",
    "predict": "score image files",
    "calibrate": "fit the thresholds again on the held-out normals, with other scoring settings",
    "export": "serialize a run's scorer for fmjax.serving (jax and numpy only)",
    "config": "print the resolved config (config show)",
    "demo": "train and evaluate on the embedded textures",
    "bench": "scoring and training throughput against a plain loop, a plain forward pass and the matmul peak",
    "info": "versions, devices and the memory allocator this process runs with",
}


def _arguments(name: str, p: argparse.ArgumentParser) -> None:
    """The arguments of command `name` (kept here, away from the commands' imports, so
    parsing imports nothing of JAX before `launch.start`)."""
    from fmjax.methods import registry

    if name == "train":
        p.add_argument("--data", required=True, help="textures:NAME | folder:ROOT | mvtec:ROOT | visa:ROOT | "
                                                      "fashion_mnist:CLASS | tfds:mvtec_ad | tfds:visa")
        p.add_argument("--category", help="category folder under ROOT (folder/mvtec/visa data); "
                                          "'all' trains one model on every category")
        p.add_argument("--out", required=True, help="run folder to write")
        _config_arguments(p, registry)
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh",
                       help="data parallelism: jit over a device mesh (default) or pmap; same results")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--logdir", help="also write TensorBoard event files here (needs tensorboardX)")
    elif name == "config":
        p.add_argument("action", choices=("show",), help="show: print the resolved config as JSON")
        _config_arguments(p, registry)
        p.add_argument("--data", help="the training data, for the auto preset's choice")
        p.add_argument("--category")
    elif name == "export":
        p.add_argument("--run", required=True)
        p.add_argument("--out", required=True, help="folder to write (scorer.json, scorer.jaxexport, arrays.npz)")
        p.add_argument("--platforms", help="comma-separated: cpu, cuda, rocm, tpu (default: this machine's)")
        p.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE",
                       help="scoring setting for the exported scorer (thresholds fitted again if needed)")
    elif name == "calibrate":
        p.add_argument("--run", required=True)
        p.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE",
                       help="scoring setting to calibrate with and keep (score.*, calibration.*_threshold_quantile)")
    elif name in ("evaluate", "predict"):
        p.add_argument("--run", required=True)
        if name == "evaluate":
            p.add_argument("--data", help="default: the data the run was trained on")
            p.add_argument("--category")
            p.add_argument("--maps-out", help="write float32 TIFF maps (MVTec evaluation layout); an earlier "
                                              "fmjax output there is replaced")
            p.add_argument("--pictures-out", help="write heat-map overlay PNGs (and ROC/PR figures with matplotlib); "
                                                  "an earlier output there is replaced")
            p.add_argument("--scores-out", help="write the image scores alone, <category>/image_scores.csv; an "
                                                "earlier fmjax output there is replaced")
            p.add_argument("--logdir", help="also write the metrics as TensorBoard events (needs tensorboardX)")
        else:
            p.add_argument("--input", required=True, help="an image file or a folder of images")
            p.add_argument("--out", required=True, help="output folder (an earlier predict output there is replaced)")
            p.add_argument("--category", help="the category the images show: required for a class-conditional "
                                              "run trained with --category all")
        p.add_argument("--set", action="append", default=[], metavar="score.KEY=VALUE",
                       help="scoring override for this run only (e.g. score.num_paths=32)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar while scoring (none off a terminal)")
    elif name == "demo":
        p.add_argument("--out", default="fmjax_demo", help="folder for runs and pictures (default: fmjax_demo)")
        p.add_argument("--preset", default="auto", help="as for train (default: auto)")
        p.add_argument("--steps", type=int, default=400,
                       help="training steps per texture (default: 400, the demo's time budget; 0: the preset's)")
        p.add_argument("--patch", type=int, default=32,
                       help="side of the random training patches (default: 32, the demo's time budget; 0: the preset's)")
        p.add_argument("--train-crops", type=int, default=200,
                       help="normal training crops per texture, held-out tiles included (default: 200, the demo's "
                            "time budget; 0: the preset's)")
        p.add_argument("--textures", default="brick,grass,gravel")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--no-progress", action="store_true")
    elif name == "bench":
        p.add_argument("--quick", action="store_true", help="reduced set, same keys (2-3 minutes on 2 CPU cores)")
        p.add_argument("--json", help="also write the figures as JSON here")


def _config_arguments(p: argparse.ArgumentParser, registry) -> None:
    p.add_argument("--preset", help="auto | texture | aligned | small | tiny | paper (default: the --config file's, "
                                    "else auto: chosen from the training images)")
    p.add_argument("--method", help=f"{' | '.join(registry.names())} (default: the --config file's, else "
                                    f"flow_mismatch; recon scores a flow model by reconstruction)")
    p.add_argument("--config", help="JSON or YAML file of settings over the preset (e.g. a run's config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (last word)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--devices", type=int, default=argparse.SUPPRESS,
                        help="CPU only: host devices to make (default: one per core; 1 turns multi-device off)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also FMJAX_DEBUG=1)")
    common.add_argument("--distributed", action="store_true", default=argparse.SUPPRESS,
                        help="one run over every process of a Slurm or Open MPI job (JAX detects the cluster; "
                             "also FMJAX_DISTRIBUTED=1; docs/multihost.md)")
    p = argparse.ArgumentParser(prog="fmjax", description="Flow Mismatching anomaly detection in JAX.",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        _arguments(name, sub.add_parser(name, help=help_text, parents=[common]))
    return p


def _one_line_warnings(command: str) -> None:
    """fmjax's warnings as 'fmjax COMMAND: warning: ...', each message once (a command may
    read its data twice); other libraries' as they are."""
    from fmjax.errors import FmjaxWarning

    plain, shown = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FmjaxWarning):
            if str(message) not in shown:
                shown.add(str(message))
                print(f"fmjax {command}: warning: {message}", file=sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv=None) -> int:
    """Runs the command line `argv` (default: this process's); returns the exit code."""
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FMJAX_DEBUG", "") not in ("", "0")
    from fmjax.errors import FmjaxError, describe, first_line

    _one_line_warnings(args.command)
    try:
        from fmjax.app import launch

        if args.command != "config":  # printing a config needs no devices
            launch.start(getattr(args, "devices", 0),
                         distributed=False if args.command == "info" else getattr(args, "distributed", None))
        importlib.import_module(f"fmjax.app.{args.command}").main(args)
    except (FmjaxError, OSError) as err:
        if debug:
            raise
        print(f"fmjax {args.command}: error: {describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmjax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if debug:
            raise
        print(f"fmjax {args.command}: internal error: {type(err).__name__}: {first_line(err)} "
              f"(run again with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
