"""`fmjax export`: serialize a run's whole jitted scorer (network parameters, fixed noise,
fitted arrays, thresholds) with `jax.export` for the platforms asked, so that
`fmjax.serving.load` runs it with JAX and numpy only."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from fmjax import runs, serving
from fmjax.errors import ConfigError
from fmjax.files import Outputs, sha256_of
from fmjax.version import __version__

__all__ = ["PLATFORMS", "export_run", "main"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _network(net, image_shape, platforms):
    """apply_fn(params, x, t, y) of the run's U-Net for `platforms`: with net.kernels =
    auto, the XLA:CPU blocks on cpu and the plain ones elsewhere, chosen where the
    program runs (`jax.lax.platform_dependent`); both have the same parameters."""
    import jax

    from fmjax.nets import unet

    kinds = {"cpu" if p == "cpu" else "plain" for p in platforms} if net.kernels == "auto" else {net.kernels}
    applies = {k: unet.build_model(dataclasses.replace(net, kernels=k), image_shape)[1] for k in kinds}
    if len(applies) == 1:
        return next(iter(applies.values()))

    def apply(params, x, t, y=None):
        return jax.lax.platform_dependent(params, x, t, cpu=lambda p, x, t: applies["cpu"](p, x, t, y),
                                          default=lambda p, x, t: applies["plain"](p, x, t, y))

    return apply


def export_run(run: runs.Run, out_dir: str, platforms=None) -> dict:
    """Writes OUT/scorer.json, OUT/scorer.jaxexport and OUT/arrays.npz (see fmjax.serving)
    for `platforms` (default: this machine's); returns scorer.json's contents."""
    import jax
    from jax import export as jax_export

    platforms = tuple(platforms or ({"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend()),))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ConfigError(f"--platforms {','.join(platforms)}: each must be one of {', '.join(PLATFORMS)}")
    program = run.method.program(run, _network(run.config.net, run.image_shape, platforms))
    leaves, treedef = jax.tree.flatten({"params": run.params, "consts": program.consts})
    leaves = [np.asarray(leaf) for leaf in leaves]

    def scoring(arrays, images_u8, class_ids):
        tree = jax.tree.unflatten(treedef, arrays)
        maps, outputs = program.fn(tree["params"], tree["consts"], images_u8, class_ids)
        return maps.astype(np.float32), outputs.astype(np.float32)

    specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
             jax.ShapeDtypeStruct((program.batch,) + run.image_shape, np.uint8),
             jax.ShapeDtypeStruct((program.batch,), np.int32))
    exported = jax_export.export(jax.jit(scoring), platforms=platforms)(*specs)
    finish = program.finish_fitted
    meta = {"format": serving.FORMAT, "method": run.config.method, "image_shape": list(run.image_shape),
            "batch": program.batch, "platforms": list(platforms), "finish": program.finish,
            "finish_values": {} if finish is None else finish.values,
            "decision": None if program.decision is None else list(program.decision),
            "num_arrays": len(leaves), "settings": runs.scoring_settings(run.config),
            "thresholds": {k: run.calibration[k] for k in ("image_threshold", "pixel_threshold", "display_max")
                           if k in run.calibration},
            "versions": {"fmjax": __version__, "jax": jax.__version__}}
    arrays = {f"c{i:05d}": a for i, a in enumerate(leaves)}
    arrays.update({f"f_{k}": np.asarray(v) for k, v in ({} if finish is None else finish.arrays).items()})
    with Outputs() as out:  # published whole; an earlier export there is replaced
        tmp = out.folder(out_dir, "--out")
        with open(os.path.join(tmp, serving.PROGRAM), "wb") as f:
            f.write(exported.serialize())
        np.savez(os.path.join(tmp, serving.ARRAYS), **arrays)
        meta["sha256"] = {name: sha256_of(os.path.join(tmp, name)) for name in (serving.PROGRAM, serving.ARRAYS)}
        with open(os.path.join(tmp, serving.META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=float)
    return meta


def main(args) -> None:
    import sys

    with runs.lock(args.run, "export", shared=True):
        run = runs.load_run(args.run, args.set)
        if run.refit:
            print(f"fmjax export: note: {run.refit}", file=sys.stderr)
        platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else None
        meta = export_run(run, args.out, platforms)
    print(f"exported {meta['method']} scorer for {', '.join(meta['platforms'])} "
          f"({meta['image_shape'][0]}x{meta['image_shape'][1]}x{meta['image_shape'][2]}, {meta['batch']} images a call) "
          f"-> {args.out}")
