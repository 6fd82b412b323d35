"""Throughput measurements behind `fmjax bench`: warmed-up, compile time reported apart,
data loading excluded. Every figure comes from the same jitted scorer the CLI uses."""
from __future__ import annotations

import dataclasses
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import mismatch
from fmjax.config import preset
from fmjax.flow import to_model_range


def _timed(fn, repeats: int):
    """(seconds of the first call, mean seconds of `repeats` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - start) / repeats


def matmul_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """float32 matmul GFLOP/s of one jitted call on the default device."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    _, sec = _timed(lambda: f(a), repeats)
    return 2 * size**3 / sec / 1e9


def scorer_vs_loop(preset_name: str = "small", image_size: int = 64, num_paths: int = 8, num_times: int = 8,
                   num_images: int = 4, channels: int = 1, repeats: int = 2, seed: int = 0) -> dict:
    """Images/s of the jitted, vmapped, chunked scorer against a plain Python loop over
    (image, time, path) calling a jitted single network evaluation; same maps (checked)."""
    from fmjax.nets import unet
    from fmjax.train import build_model

    config = preset(preset_name)
    config = config.replace(data=dataclasses.replace(config.data, image_size=image_size, channels=channels),
                            score=dataclasses.replace(config.score, num_paths=num_paths, num_times=num_times,
                                                      aggregate="mean", smooth_sigma=0.0))
    shape = (image_size, image_size, channels)
    _, params = unet.create(config.net, shape, jax.random.PRNGKey(seed))
    # non-trivial weights (zero-initialised output layers would make every map zero)
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    _, apply_fn = build_model(config, shape)
    images = np.random.default_rng(seed).integers(0, 256, (num_images,) + shape, dtype=np.uint8)

    scorer = mismatch.Scorer(apply_fn, config.score, shape)
    compile_s, scorer_s = _timed(lambda: scorer.score(params, images), repeats)

    one = jax.jit(lambda p, y, eps, t: jnp.sum(jnp.square(apply_fn(p, (1 - t) * eps + t * y, t, None)
                                                          - (y - eps)), axis=-1))
    noise, times = scorer.noise, np.asarray(scorer.times)

    def loop():
        maps = []
        for img in images:
            y = to_model_range(img[None])
            per_time = [np.mean([np.asarray(one(params, y, noise[k:k + 1], jnp.full((1,), t)))[0]
                                 for k in range(num_paths)], axis=0) for t in times]
            maps.append(np.mean(np.square(times)[:, None, None] * np.stack(per_time), axis=0))
        return np.stack(maps)

    _, loop_s = _timed(loop, 1)
    max_diff = float(np.max(np.abs(loop() - scorer.score(params, images)[0])))
    evals = num_images * num_paths * num_times
    return {"preset": preset_name, "image_size": image_size, "K": num_paths, "T": num_times,
            "devices": len(jax.local_devices()), "scorer_images_per_s": num_images / scorer_s,
            "scorer_evals_per_s": evals / scorer_s, "loop_images_per_s": num_images / loop_s,
            "scorer_vs_loop": loop_s / scorer_s, "compile_s": compile_s, "max_abs_diff": max_diff}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(quick: bool = True) -> dict:
    """The bench: scorer vs loop at K=8, T=8 (and 16x30 unless quick), matmul peak, memory."""
    cases = [("small", 64, 8, 8)] + ([] if quick else [("small", 64, 16, 30), ("tiny", 32, 8, 8)])
    results = [scorer_vs_loop(p, s, k, t, num_images=2 if quick else 4) for p, s, k, t in cases]
    return {"cases": results, "peak_gflops": matmul_peak_gflops(), "peak_rss_mb": peak_rss_mb(),
            "cpu_count": os.cpu_count()}
