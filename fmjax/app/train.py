"""`fmjax train`: read the data, train the method's network through the shared loop, fit
what the method needs on normal training images, and leave a run folder ready to score."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil

from fmjax import data as data_lib
from fmjax import runs
from fmjax.config import AUTO, Config, apply_overrides, build, layer, preset, read_config_file, with_method
from fmjax.data import profile
from fmjax.errors import RunError
from fmjax.files import temp_path, write_json, write_text_atomic
from fmjax.methods import registry

__all__ = ["main", "preset_name", "rescore_run", "resolve_auto", "resolve_channels", "resolve_flips", "train_run"]


def resolve_channels(config: Config, channels: int) -> Config:
    """Fixes config.data.channels to the channel count the data actually has."""
    return config.replace(data=dataclasses.replace(config.data, channels=int(channels)))


def resolve_flips(config: Config, spec: str, categories) -> Config:
    """Settles train.hflip / train.vflip left at None (auto) from the data: on for
    orientation-free data (fmjax.data.orientation_free), off otherwise."""
    free = data_lib.orientation_free(spec, categories)
    tc = config.train
    return config.replace(train=dataclasses.replace(tc, hflip=free if tc.hflip is None else tc.hflip,
                                                    vflip=free if tc.vflip is None else tc.vflip))


def _training_data(config: Config, spec: str, category: str | None):
    """(normal training Split, data.json contents) for one category or `--category all`."""
    if category == "all":
        # one unified model; the class ids are category indices (used when net.num_classes > 0)
        datasets = data_lib.load_all(spec, config.data)
        if config.net.num_classes not in (0, len(datasets)):
            raise RunError(f"--category all found {len(datasets)} categories: set net.num_classes to 0 "
                           f"(one unconditional model) or {len(datasets)} (class-conditional)")
        categories = [d.category for d in datasets]
        return data_lib.unified_train(datasets), {"spec": spec, "category": "all", "categories": categories}
    dataset = data_lib.load(spec, category, config.data, config.textures)
    return dataset.train, {"spec": spec, "category": dataset.category}


def preset_name(args) -> str:
    """The preset a command asks for: --preset, else the --config file's, else auto."""
    if args.preset:
        return args.preset
    return (read_config_file(args.config).get("preset") if args.config else None) or AUTO


def resolve_auto(spec: str, category: str | None, method: str | None = None, overrides=(),
                 config_file: str | None = None):
    """The `auto` preset: 'aligned' or 'texture' (fmjax.data.profile.kind) chosen from the
    normal training images, then the --config file's settings and the overrides.

    aligned: whole images at their own size (profile.aligned_size), per-pixel statistics;
    texture: the texture preset (whole images; flips on for plain image folders, whose
    orientation is otherwise unknown). Returns (config, (train Split, data.json contents),
    a one-line reason)."""
    values = read_config_file(config_file) if config_file else {}
    method = method or values.get("method") or "flow_mismatch"
    probe = preset("texture", method)
    train, data_info = _training_data(probe, spec, category)
    score = profile.alignment(train.images)
    chosen = profile.kind(train.images)
    reason = f"alignment {score:.3f} {'>' if chosen == 'aligned' else '<='} {profile.ALIGNED_THRESHOLD}"
    config = preset(chosen, method)
    if chosen == "aligned":
        size = profile.aligned_size(train.original_sizes)
        config = registry.get(method).fit_to_image_size(
            config.replace(data=dataclasses.replace(config.data, image_size=size)))
        reason += f", image size {size}"
    elif data_lib.parse_spec(spec)[0] == "folder":
        config = config.replace(train=dataclasses.replace(config.train, hflip=True, vflip=True))
    if values:
        config = layer(config, {**values, "method": method, "preset": chosen})
    config = apply_overrides(config, overrides)
    if config.data != probe.data or config.textures != probe.textures:
        train, data_info = _training_data(config, spec, category)
    return config, (train, dict(data_info, preset=f"auto: {chosen} ({reason})")), f"{chosen} ({reason})"


def train_run(config: Config, spec: str, category: str | None, run_dir: str, resume: bool = False,
              progress: bool = True, devices=None, use_pmap: bool = False, data=None,
              logdir: str | None = None) -> runs.Run:
    """Reads the data (unless `data` = (train Split, data.json contents) is given), trains
    the method's network on the normal training images but the held-out ones, then fits
    the method on normal images (`runs.fit_run`). Returns the Run. logdir: TensorBoard
    event files of every logged step (train/loss, grad_norm, images_per_s, learning_rate;
    `fmjax.eval.events`)."""
    from fmjax.distributed import multihost
    from fmjax.training import loop

    train, data_info = data or _training_data(config, spec, category)
    config = resolve_flips(resolve_channels(config, train.images.shape[-1]), spec,
                           data_info.get("categories", [data_info["category"]]))
    cal = config.calibration
    fit, holdout = runs.holdout_split(config, train)
    method = registry.get(config.method)
    needed, held = method.min_holdout(config), 0 if holdout is None else len(holdout)
    if held < needed:
        raise RunError(f"{config.method} with these settings needs at least {needed} held-out normal images; "
                       f"calibration.holdout_fraction={cal.holdout_fraction} holds out {held} of {len(train)}: "
                       f"raise it, or set score.normalize=none")
    data_path = os.path.join(run_dir, runs.DATA)
    writer = multihost.is_writer()  # on several hosts, process 0 writes the folder
    os.makedirs(run_dir, exist_ok=True)
    with runs.lock(run_dir, "train", enabled=writer), contextlib.ExitStack() as stack:
        if resume and os.path.exists(data_path) and runs.read_json(data_path) != data_info:
            raise RunError(f"--resume: {data_path} says {runs.read_json(data_path)}, not {data_info}")
        if writer and (resume or not os.path.isdir(os.path.join(run_dir, runs.CHECKPOINTS))):
            runs.remove_manifest(run_dir)  # the folder changes; written again when it is complete
        on_log = None
        if logdir:
            from fmjax.eval.events import EventLog
            from fmjax.training.state import learning_rate

            log = stack.enter_context(EventLog(logdir))

            def on_log(record):
                values = {k: v for k, v in record.items() if k != "step"}
                values["learning_rate"] = learning_rate(config.train, record["step"] - 1)  # the last update's
                log.scalars("train", values, record["step"])

        loop.train(config, method.objective(config), fit.images, run_dir, class_ids=fit.class_ids, resume=resume,
                   progress=progress, devices=devices, use_pmap=use_pmap,
                   init_shape=method.init_shape(config, fit.images.shape[1:]), on_log=on_log,
                   heldout=None if holdout is None else (holdout.images, holdout.class_ids))
        stack.close()
        if writer:
            write_json(data_path, data_info)
        run = runs.load_run(run_dir)
        run.fitted = runs.fit_run(run, train)
        if writer:
            runs.save_fitted(run_dir, run.fitted)
    return run


def rescore_run(src_dir: str, dst_dir: str, method: str, overrides=()) -> runs.Run:
    """A new run folder scoring the network of `src_dir` with another method that trains
    the same network (e.g. flow_mismatch <-> recon): checkpoints and data.json copied,
    config.json with `method` and the scoring `overrides`, the new method fitted again
    on the same normal images."""
    src = runs.load_run(src_dir)
    if registry.get(method).model != src.method.model:
        raise RunError(f"{src_dir} trained a {src.method.model} network for {src.config.method}; "
                       f"{method} needs a {registry.get(method).model} network")
    if os.path.exists(dst_dir):
        raise RunError(f"{dst_dir} already exists: choose a new folder")
    config = with_method(src.config, method)
    config = apply_overrides(config, runs.check_score_overrides(config, overrides))
    os.makedirs(os.path.dirname(os.path.abspath(dst_dir)), exist_ok=True)
    tmp = temp_path(dst_dir, "stage")
    try:
        shutil.copytree(os.path.join(src_dir, "checkpoints"), os.path.join(tmp, "checkpoints"))
        write_json(os.path.join(tmp, runs.DATA), src.data_info)
        write_text_atomic(os.path.join(tmp, runs.CONFIG), config.to_json())
        os.replace(tmp, dst_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run = runs.load_run(dst_dir)
    run.fitted = runs.fit_run(run)
    runs.save_fitted(dst_dir, run.fitted)
    return run


def main(args) -> None:
    data = None
    if preset_name(args) == AUTO:
        config, data, reason = resolve_auto(args.data, args.category, args.method, args.set, args.config)
        print(f"preset auto: {reason}", flush=True)
    else:
        config = build(args.preset, args.method, args.set, args.config)
    run = train_run(config, args.data, args.category, args.out, resume=args.resume, progress=not args.no_progress,
                    use_pmap=args.parallel == "pmap", data=data, logdir=args.logdir)
    from fmjax.training.checkpoints import latest_step

    steps = latest_step(args.out)
    stopped = "" if steps == run.config.train.steps else f" (early stop; train.steps {run.config.train.steps})"
    print(f"trained {steps} steps{stopped} -> {args.out}")
