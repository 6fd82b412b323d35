"""`fmjax bench`: the figures are computed from what they claim (on the tiny preset)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import bench
from fmjax.cli import main


def test_flops_of_counts_a_matmul_exactly():
    f = jax.jit(lambda a, b: a @ b)
    assert bench.flops_of(f, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4


def test_scoring_case_matches_the_loop_and_its_ratios():
    case = bench.scoring_case("tiny", 16, num_paths=2, num_times=3, num_images=1, repeats=1)
    assert case["max_abs_diff"] < 1e-3
    evals = case["score_images_per_s"] * 2 * 3
    assert case["scorer_evals_per_s"] == pytest.approx(evals, rel=1e-9)
    assert case["scorer_vs_forward"] == pytest.approx(case["scorer_evals_per_s"] / case["forward_evals_per_s"])
    assert case["scorer_gflops"] == pytest.approx(case["gflops_per_eval"] * case["scorer_evals_per_s"])
    assert case["scorer_vs_loop"] == pytest.approx(case["score_images_per_s"] / case["loop_images_per_s"])
    # a U-Net forward costs more than its 3x3 convolutions' multiply-adds on the input alone
    assert case["gflops_per_eval"] * 1e9 > 2 * 9 * 16 * 16 * 16


def test_training_case_runs_the_step_and_the_forward():
    case = bench.training_case("tiny", 16, devices=jax.local_devices()[:1], steps=1)
    assert case["devices"] == 1 and case["batch_size"] == 8
    assert case["train_images_per_s"] == pytest.approx(case["batch_size"] / case["step_s"])
    assert case["train_vs_forward"] == pytest.approx(case["step_s"] / case["forward_s"])
    assert case["train_vs_forward"] > 1.0  # a step is a forward plus a backward and an update


def test_bench_cli_json_has_every_key(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "QUICK_SCORING", [("tiny", 16, 2, 2, 1)])
    monkeypatch.setattr(bench, "QUICK_TRAINING", [("tiny", 16)])
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("scorer_vs_loop", "scorer_vs_forward", "train_vs_forward", "scorer_peak_fraction", "peak_gflops",
                "scorer_gflops", "train_images_per_s", "score_images_per_s", "compile_s", "peak_rss_mb"):
        assert isinstance(result[key], float) and np.isfinite(result[key]) and result[key] > 0, key
    assert result["scorer_peak_fraction"] == pytest.approx(result["scorer_gflops"] / result["peak_gflops"])
    devices = jax.local_device_count()
    assert [c["devices"] for c in result["scoring"]] == [devices, 1]
    assert [c["devices"] for c in result["training"]] == [devices, 1]
    printed = capsys.readouterr().out
    assert "| figure | value |" in printed and "scorer_peak_fraction" in printed
