"""`fmjax bench`: the timing helper, the FLOP count, and one tiny-preset run: every key present,
the summary taken from the headline case, the scorer's maps equal to the plain loop's."""
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, subprocess_env

from fmjax.app import bench

KEYS = ("scorer_vs_loop", "scorer_vs_forward", "train_vs_forward", "scorer_peak_fraction", "peak_gflops",
        "scorer_gflops", "train_images_per_s", "score_images_per_s", "compile_s", "peak_rss_mb")


BENCH_CHILD = """
import sys
from fmjax.app import allocator, bench
from fmjax.app.cli import main
bench.QUICK_SCORING = [("tiny", 16, 2, 3, 1)]
bench.QUICK_TRAINING = [("tiny", 16)]
assert main(["bench", "--quick", "--json", sys.argv[1]]) == 0
print(allocator.loaded_allocator())
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """`fmjax bench --quick --json` on the tiny preset at 16x16, K=2, T=3, one image, in a
    child on two devices that compiles quickly (the figures are checked, not their size);
    "child_allocator" is the allocator the child reports having loaded."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-c", BENCH_CHILD, str(out)], cwd=ROOT, env=subprocess_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "child_allocator": proc.stdout.strip().splitlines()[-1]}


def test_timed_alternating_interleaves_the_calls_after_the_warmup_and_takes_medians():
    calls = []

    def sleeper(name, seconds):
        def call():
            calls.append(name)
            time.sleep(seconds[len([c for c in calls if c == name]) - 1])
        return call

    # a: the first call (compiling) and the warm-up slow, then one slow timed call of three
    # (a mean, or a timed warm-up, would put a above 0.1 s)
    a = sleeper("a", [0.3, 0.3, 0.001, 0.5, 0.001])
    b = sleeper("b", [0.0, 0.1, 0.1, 0.1, 0.1])
    (first_a, median_a), (_, median_b) = bench.timed_alternating([a, b], 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b"]
    assert first_a >= 0.3 and 0.001 <= median_a < 0.1 <= median_b < 0.2


def test_flops_of_counts_a_matmul_exactly():
    f = jax.jit(lambda a, b: a @ b)
    assert bench.flops_of(f, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4


def test_json_has_every_key_and_the_summary_is_the_headline_case(bench_run):
    for key in KEYS:
        assert isinstance(bench_run[key], float) and np.isfinite(bench_run[key]) and bench_run[key] > 0, key
    devices = 2  # the child's
    assert [c["devices"] for c in bench_run["scoring"]] == [devices, 1]
    assert [c["devices"] for c in bench_run["training"]] == [devices, 1]
    head, one = bench_run["scoring"]
    assert bench_run["score_images_per_s"] == head["score_images_per_s"]
    assert bench_run["score_images_per_s_1_device"] == one["score_images_per_s"]
    assert bench_run["train_images_per_s_1_device"] == bench_run["training"][1]["train_images_per_s"]
    assert bench_run["allocator"] == bench_run["child_allocator"]


def test_scoring_figures_match_the_loop(bench_run):
    case = bench_run["scoring"][0]
    assert case["max_abs_diff"] < 1e-3  # the scorer's maps are the plain loop's
    assert case["scorer_evals_per_s"] == pytest.approx(case["score_images_per_s"] * 2 * 3)  # K * T per image
    # a U-Net forward costs more than one 3x3 convolution to 16 channels on its input
    assert case["gflops_per_eval"] * 1e9 > 2 * 9 * 16 * 16 * 16
    assert "scorer_vs_loop" not in bench_run["scoring"][1]  # the loop runs once, on all devices


def test_training_figures(bench_run):
    for case in bench_run["training"]:
        assert case["batch_size"] == 8
        assert case["train_vs_forward"] > 1.0  # a step is a forward plus a backward and an update
