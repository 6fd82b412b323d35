"""`fmjax bench`: the throughput measurements behind it and experiments/bench.py: warmed-up
per-call timings (medians), compile time reported apart, data loading excluded. Every scoring
figure comes from the same jitted scorer the CLI uses; every training figure from the
CLI's jitted train step.

Figures (per case):
  scorer_vs_loop     scorer images/s over a plain Python loop over (path, time) calling
                     a jitted single network evaluation (same maps, checked)
  scorer_vs_forward  scorer network evaluations/s over those of a plain jitted forward
                     pass on the same devices with the same number of inputs per call
  train_vs_forward   train step time over the forward time of the same batch
  scorer_gflops      network FLOPs (XLA cost analysis of the forward) x evaluations/s
The two sides of scorer_vs_forward and of train_vs_forward are timed in alternation
(`timed_alternating`), so a change in the shared machine's load between calls does not
land on one side only.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import xla_options
from fmjax.app.allocator import loaded_allocator
from fmjax.config import preset
from fmjax.distributed.mesh import data_mesh, replicated, rows
from fmjax.flow import to_model_range
from fmjax.methods.flow_mismatch.scorer import Scorer

QUICK_SCORING = [("small", 64, 8, 8, 2)]
FULL_SCORING = [(p, s, k, t, n) for p in ("small", "paper") for s in (64, 128) for k, t, n in ((8, 8, 2), (16, 30, 1))]
QUICK_TRAINING = [("small", 64)]
FULL_TRAINING = [("small", 64), ("small", 128), ("paper", 64)]


def timed(fn, repeats: int, warmup: int = 0):
    """(seconds of the first call, median seconds of `repeats` further calls)."""
    return timed_alternating([fn], repeats, warmup)[0]


def timed_alternating(fns, repeats: int, warmup: int = 0):
    """[(seconds of the first call, median seconds of `repeats` further calls)] for each of
    `fns`. After the first calls (which compile), `warmup` untimed rounds of calls; the
    timed calls are interleaved (a, b, b, a, a, b, ...) so that a drift in the machine's
    load between calls touches every fn alike: their ratio is what the bench reports."""
    firsts = []
    for fn in fns:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        firsts.append(time.perf_counter() - start)
    for _ in range(warmup):
        for fn in fns:
            jax.block_until_ready(fn())
    seconds = [[] for _ in fns]
    for round_ in range(repeats):
        order = range(len(fns)) if round_ % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            jax.block_until_ready(fns[i]())
            seconds[i].append(time.perf_counter() - start)
    return [(first, float(np.median(s))) for first, s in zip(firsts, seconds)]


def flops_of(fn, *args) -> float:
    """FLOPs of one call of jitted `fn` on `args`, from XLA's cost analysis (0 if unknown)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def matmul_peak_gflops(devices=None, size: int = 1024, repeats: int = 5) -> float:
    """float32 matmul GFLOP/s of the machine: the better of one jitted matmul on one device
    and one independent matmul per device at once (XLA:CPU runs a device on about a core)."""
    devices = list(devices if devices is not None else jax.local_devices())
    single = jax.jit(lambda x: x @ x)
    a = jnp.ones((size, size), jnp.float32)
    _, one_s = timed(lambda: single(a), repeats)
    many = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32), rows(data_mesh(devices)))
    batched = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    _, all_s = timed(lambda: batched(many), repeats)
    return max(2 * size**3 / one_s, 2 * len(devices) * size**3 / all_s) / 1e9


@functools.lru_cache(maxsize=4)
def bench_model(preset_name: str, image_size: int, channels: int = 1, seed: int = 0):
    """(config, image shape, params, module, apply_fn) of a preset with non-trivial weights
    (zero-initialised output layers would make every map zero)."""
    from fmjax.nets import unet

    config = preset(preset_name)
    config = config.replace(data=dataclasses.replace(config.data, image_size=image_size, channels=channels))
    shape = (image_size, image_size, channels)
    _, params = unet.create(config.net, shape, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1)  # numpy: per-leaf jax draws would each compile
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape).astype(np.float32), params)
    module, apply_fn = unet.build_model(config.net, shape)
    return config, shape, params, module, apply_fn


def _loop_maps(apply_fn, params, images, noise, times):
    """The plain way: one jitted network evaluation per (image, time, path), mean over
    paths, t^2-weighted mean over times -> maps [N,H,W] and seconds."""
    one = xla_options.jit(lambda p, y, eps, t: jnp.sum(jnp.square(apply_fn(p, (1 - t) * eps + t * y, t, None)
                                                          - (y - eps)), axis=-1))

    def loop():
        maps = []
        for img in images:
            y = to_model_range(img[None])
            per_time = [np.mean([np.asarray(one(params, y, noise[k:k + 1], jnp.full((1,), t)))[0]
                                 for k in range(len(noise))], axis=0) for t in times]
            maps.append(np.mean(np.square(times)[:, None, None] * np.stack(per_time), axis=0))
        return np.stack(maps)

    jax.block_until_ready(one(params, to_model_range(images[:1]), noise[:1], jnp.full((1,), times[0])))  # compiles
    start = time.perf_counter()
    maps = loop()
    return maps, time.perf_counter() - start


def scoring_case(preset_name: str, image_size: int, num_paths: int, num_times: int, num_images: int,
                 devices=None, with_loop: bool = True, repeats: int = 2, seed: int = 0) -> dict:
    """Scorer images/s and evaluations/s on `devices`, against a plain loop (optional) and a
    plain batched forward pass; achieved GFLOP/s from the forward's cost analysis."""
    devices = list(devices if devices is not None else jax.local_devices())
    config, shape, params, _, apply_fn = bench_model(preset_name, image_size, seed=seed)
    score_cfg = dataclasses.replace(config.score, num_paths=num_paths, num_times=num_times, aggregate="mean",
                                    time_weight="t2", smooth_sigma=0.0)
    images = np.random.default_rng(seed).integers(0, 256, (num_images,) + shape, dtype=np.uint8)
    scorer = Scorer(apply_fn, score_cfg, shape, devices=devices)
    params = jax.device_put(params, replicated(scorer.mesh))
    start = time.perf_counter()
    scorer.score(params, images)  # compiles; settles the chunk when the preset says 0 (memory budget)
    first_s = time.perf_counter() - start
    evals = num_images * num_paths * num_times

    chunk = scorer.chunk_for(num_images)
    split = rows(scorer.mesh)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(2), (chunk * len(devices),) + shape), split)
    t = jax.device_put(jnp.full((chunk * len(devices),), 0.5), split)
    forward = xla_options.jit(lambda p, x, t: apply_fn(p, x, t, None))
    (_, scorer_s), (_, forward_s) = timed_alternating(
        [lambda: scorer.score(params, images), lambda: forward(params, x, t)], repeats)
    compile_s = first_s - scorer_s
    flops_per_eval = flops_of(xla_options.jit(lambda p, x, t: apply_fn(p, x, t, None)), params, x[:chunk], t[:chunk]) / chunk
    forward_evals_per_s = chunk * len(devices) / forward_s

    result = {"preset": preset_name, "image_size": image_size, "K": num_paths, "T": num_times,
              "images": num_images, "devices": len(devices), "chunk_size": chunk,
              "score_images_per_s": num_images / scorer_s, "scorer_evals_per_s": evals / scorer_s,
              "forward_evals_per_s": forward_evals_per_s,
              "scorer_vs_forward": evals / scorer_s / forward_evals_per_s,
              "gflops_per_eval": flops_per_eval / 1e9, "scorer_gflops": flops_per_eval * evals / scorer_s / 1e9,
              "compile_s": compile_s}
    if with_loop:
        loop_maps, loop_s = _loop_maps(apply_fn, params, images, scorer.noise, np.asarray(scorer.times))
        result.update(loop_images_per_s=num_images / loop_s, scorer_vs_loop=loop_s / scorer_s,
                      max_abs_diff=float(np.max(np.abs(loop_maps - scorer.score(params, images)[0]))))
    return result


def training_case(preset_name: str, image_size: int, devices=None, steps: int = 6, warmup: int = 2,
                  seed: int = 0) -> dict:
    """Train-step time and images/s of the CLI's jitted step (state donated, batch split over
    `devices`) for the preset's batch size, and the forward time of the same batch: medians
    of `steps` calls each after `warmup` untimed ones (the first steps after compiling ran
    up to 2x slower than later ones)."""
    from fmjax.methods import registry
    from fmjax.training.state import init_state
    from fmjax.training.step import make_step_fn

    devices = list(devices if devices is not None else jax.local_devices())
    config, shape, _, module, apply_fn = bench_model(preset_name, image_size, seed=seed)
    batch = config.train.batch_size
    if batch % len(devices):
        raise ValueError(f"bench: batch size {batch} does not split over {len(devices)} devices")
    mesh = data_mesh(devices)
    state = jax.device_put(init_state(config, shape, jax.random.PRNGKey(seed)), replicated(mesh))
    step_fn = make_step_fn(registry.get(config.method).objective(config), module, config, mesh)
    images = jax.device_put(np.random.default_rng(seed).integers(0, 256, (batch,) + shape, dtype=np.uint8),
                            rows(mesh))
    labels = jax.device_put(np.zeros(batch, np.int32), rows(mesh))
    key = jax.device_put(jax.random.PRNGKey(seed), replicated(mesh))
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], images, labels, key)
        return metrics

    side = config.train.patch_size or image_size  # the step trains on patches of this side
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(2), (batch, side, side, shape[-1])), rows(mesh))
    t = jax.device_put(jnp.full((batch,), 0.5), rows(mesh))
    forward = xla_options.jit(lambda p, x, t: apply_fn(p, x, t, None))
    (first_s, step_s), (_, forward_s) = timed_alternating(
        [step, lambda: forward(holder["state"].params, x, t)], steps, warmup)
    compile_s = first_s - step_s
    return {"preset": preset_name, "image_size": image_size, "patch_size": side, "batch_size": batch,
            "devices": len(devices), "step_s": step_s, "train_images_per_s": batch / step_s,
            "forward_s": forward_s, "train_vs_forward": step_s / forward_s, "compile_s": compile_s}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb():
    """Peak device memory in MB where the backend reports it (None on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def run(quick: bool = True, log=print, scoring_cases=None, training_cases=None, loop_max_evals: int = 64) -> dict:
    """The bench. Scoring and training on all devices, the first case of each also on one
    device; the top-level figures summarise those first (headline) cases.

    scoring_cases: [(preset, size, K, T, images)], training_cases: [(preset, size)]
    (default: the quick or the full set).  The plain loop runs where K*T <= loop_max_evals.
    """
    devices = jax.local_devices()
    device_sets = [devices] + ([devices[:1]] if len(devices) > 1 else [])
    scoring_cases = scoring_cases or (QUICK_SCORING if quick else FULL_SCORING)
    training_cases = training_cases or (QUICK_TRAINING if quick else FULL_TRAINING)
    scoring, training = [], []
    for i, (name, size, k, t, n) in enumerate(scoring_cases):
        for devs in device_sets if i == 0 else device_sets[:1]:
            log(f"scoring: {name} {size}x{size} K={k} T={t} on {len(devs)} device(s)")
            scoring.append(scoring_case(name, size, k, t, n, devs, with_loop=devs is devices and k * t <= loop_max_evals))
    for i, (name, size) in enumerate(training_cases):
        for devs in device_sets if i == 0 else device_sets[:1]:
            log(f"training: {name} {size}x{size} on {len(devs)} device(s)")
            training.append(training_case(name, size, devs))
    peak = matmul_peak_gflops(devices)
    head, head1 = scoring[0], next((c for c in scoring if c["devices"] == 1), scoring[0])
    train_head, train1 = training[0], next((c for c in training if c["devices"] == 1), training[0])
    return {
        "scorer_vs_loop": head.get("scorer_vs_loop"),
        "scorer_vs_forward": head["scorer_vs_forward"],
        "train_vs_forward": train_head["train_vs_forward"],
        "scorer_peak_fraction": head["scorer_gflops"] / peak,
        "peak_gflops": peak,
        "scorer_gflops": head["scorer_gflops"],
        "train_images_per_s": train_head["train_images_per_s"],
        "train_images_per_s_1_device": train1["train_images_per_s"],
        "score_images_per_s": head["score_images_per_s"],
        "score_images_per_s_1_device": head1["score_images_per_s"],
        "compile_s": head["compile_s"],
        "peak_rss_mb": peak_rss_mb(),
        "device_peak_mb": device_peak_mb(),
        "allocator": loaded_allocator(),
        "devices": len(devices), "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "quick": quick, "scoring": scoring, "training": training,
    }


SCORING_COLUMNS = ["preset", "image_size", "K", "T", "devices", "score_images_per_s", "scorer_evals_per_s",
                   "forward_evals_per_s", "scorer_vs_forward", "loop_images_per_s", "scorer_vs_loop", "scorer_gflops",
                   "compile_s", "max_abs_diff"]
TRAINING_COLUMNS = ["preset", "image_size", "patch_size", "batch_size", "devices", "train_images_per_s", "step_s",
                    "forward_s", "train_vs_forward", "compile_s"]
SUMMARY_KEYS = ["scorer_vs_loop", "scorer_vs_forward", "train_vs_forward", "scorer_peak_fraction", "peak_gflops",
                "scorer_gflops", "train_images_per_s", "train_images_per_s_1_device", "score_images_per_s",
                "score_images_per_s_1_device", "compile_s", "peak_rss_mb", "device_peak_mb", "allocator"]


def report(result: dict) -> str:
    """Markdown: the scoring table, the training table, the summary figures."""
    from fmjax.eval.viz import markdown_table

    summary = [{"figure": k, "value": result[k] if result[k] is not None else "n/a"} for k in SUMMARY_KEYS]
    return "\n\n".join([markdown_table(result["scoring"], SCORING_COLUMNS),
                        markdown_table(result["training"], TRAINING_COLUMNS),
                        markdown_table(summary, ["figure", "value"])])


def main(args) -> None:
    from fmjax.files import write_json

    start = time.perf_counter()
    result = run(quick=args.quick, log=lambda line: print(line, flush=True))
    result["wall_s"] = time.perf_counter() - start
    print(report(result))
    print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        write_json(args.json, result)
