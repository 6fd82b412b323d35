"""Mutation check: does the test suite catch deliberate bugs in the training-to-evaluation
pipeline?

Each mutant in MUTANTS is (name, file, exact pattern, replacement, tests). The script copies
the working tree (tracked and untracked, not ignored files) to a temporary folder, never
touching the working tree itself, and for every mutant replaces the pattern (which must
occur exactly once in its file), runs only the named tests there with

    python -m pytest -q -p no:cacheprovider -x <tests>

(PYTHONPATH set to the copy, so the copy's fmjax is imported, not an installed one), puts
the file back and records the outcome: caught (a test failed), NOT CAUGHT (all passed) or
error (a collection or fixture error, the time limit). Before the mutants it checks that
the copy is what the tests import (a copy whose fmjax/__init__.py raises must fail the
tests) and that the named tests pass on the unmutated copy. It prints a markdown table
and exits with 1 when a mutant survives, errs, or its pattern is not found exactly once.

Command (from the repository root; not part of `python -m pytest`):
    python tools/mutants.py                  # every mutant
    python tools/mutants.py --only radar     # mutants whose name contains "radar"
    python tools/mutants.py --list           # the table of mutants, nothing run
Expected result: every mutant "caught", exit code 0.
Run time: 11-13 minutes on a shared 2-core CPU, about 4 of them the baseline run of the named
tests (--no-baseline skips it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    pattern: str
    replacement: str
    tests: tuple


MUTANTS = [
    # the pipeline around the core maths
    Mutant("training target sign flipped (train step only)", "fmjax/flow.py",
           'jnp.square(v.astype(jnp.float32) - target_velocity(noise["eps"], x))',
           'jnp.square(v.astype(jnp.float32) - (noise["eps"] - x))',
           ("tests/unit/test_train.py::test_flow_loss_equals_the_hand_computed_value",
            "tests/unit/test_train.py::test_learned_velocity_carries_noise_to_the_data")),
    Mutant("EMA update skipped (EMA params stay at init)", "fmjax/training/state.py",
           "params=params, ema_params=ema, opt_state=opt_state)",
           "params=params, ema_params=state.ema_params, opt_state=opt_state)",
           ("tests/unit/test_train.py::test_ema_follows_its_formula",)),
    Mutant("scoring with the raw params instead of the EMA", "fmjax/runs.py",
           "params = state.ema_params if config.score.use_ema else state.params",
           "params = state.params",
           ("tests/integration/test_cli.py::test_image_scores_are_the_ema_networks",)),
    Mutant("scorer ignores class labels", "fmjax/methods/flow_mismatch/scorer.py",
           "v = velocity_fn(x, t, None if class_ids is None else class_ids[idx[:, 0]])",
           "v = velocity_fn(x, t, None)",
           ("tests/unit/test_mismatch.py::test_class_labels_reach_the_network",
            "tests/unit/test_numpy_reference.py::test_mixed_label_maps_equal_the_definition",
            "tests/integration/test_unified.py::test_unified_train_and_evaluate")),
    Mutant("held-out normals also used for training", "fmjax/app/train.py",
           "loop.train(config, method.objective(config), fit.images, run_dir, class_ids=fit.class_ids,",
           "loop.train(config, method.objective(config), train.images, run_dir, class_ids=train.class_ids,",
           ("tests/integration/test_cli.py::test_thresholds_come_from_held_out_normals_only",)),
    Mutant("image threshold at the 0.5 quantile of the held-out scores", "fmjax/eval/calibration.py",
           "threshold_from_normals(normal_scores, calibration.image_threshold_quantile)",
           "threshold_from_normals(normal_scores, 0.5)",
           ("tests/integration/test_cli.py::test_thresholds_come_from_held_out_normals_only",)),
    Mutant("load_run ignores --set scoring overrides", "fmjax/runs.py",
           "config = apply_overrides(saved, check_score_overrides(saved, score_overrides))",
           "config = apply_overrides(saved, [])",
           ("tests/integration/test_cli.py::test_evaluate_score_overrides",)),
    Mutant("cosine learning-rate schedule ignored", "fmjax/training/state.py",
           'if cfg.lr_schedule == "cosine":', 'if cfg.lr_schedule == "never":',
           ("tests/unit/test_train.py::test_learning_rate_is_what_the_optimizer_applies",)),
    Mutant("held-out loss of the raw params instead of the EMA", "fmjax/training/loop.py",
           "evaluate_heldout(current(state).ema_params,", "evaluate_heldout(current(state).params,",
           ("tests/unit/test_train.py::test_heldout_loss_is_logged_at_checkpoints_from_the_ema_network",)),
    Mutant("early stop one checkpoint late", "fmjax/training/loop.py",
           "if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:\n                    bar.write",
           "if cfg.early_stop_patience and since_best > cfg.early_stop_patience:\n                    bar.write",
           ("tests/unit/test_train.py::test_early_stop_after_patience_checkpoints_without_a_lower_heldout_loss",)),
    Mutant("orbax's loggers quieted only after a failed save", "fmjax/training/checkpoints.py",
           "    for logger in loggers:\n        logger.setLevel(logging.CRITICAL)\n    held, unraisable_hook",
           "    held, unraisable_hook",
           ("tests/integration/test_faults.py::"
            "test_a_failed_save_says_nothing_from_orbax_threads_and_restores_their_loggers",)),
    Mutant("loggers left quiet after a good save", "fmjax/training/checkpoints.py",
           "    for logger, level in zip(loggers, levels):", "    for logger, level in []:",
           ("tests/integration/test_faults.py::"
            "test_a_failed_save_says_nothing_from_orbax_threads_and_restores_their_loggers",)),
    Mutant("a save thread's raising join escapes the save", "fmjax/training/checkpoints.py",
           "            with contextlib.suppress(Exception):\n                thread.join(",
           "            if True:\n                thread.join(",
           ("tests/integration/test_faults.py::"
            "test_a_failed_save_names_its_checkpoint_when_its_threads_raise_on_join",)),
    Mutant("a failed save's unraisable errors reach the user", "fmjax/training/checkpoints.py",
           "    sys.unraisablehook = held.append\n", "",
           ("tests/integration/test_faults.py::"
            "test_a_failed_save_drops_the_unraisable_errors_of_its_threads_and_a_good_one_keeps_them",)),
    Mutant("a good save's unraisable errors dropped", "fmjax/training/checkpoints.py",
           "        unraisable_hook(unraisable)", "        pass",
           ("tests/integration/test_faults.py::"
            "test_a_failed_save_drops_the_unraisable_errors_of_its_threads_and_a_good_one_keeps_them",)),
    Mutant("study pixel AUROC counts ties as below", "fmjax/eval/metrics.py",
           'at_or_below = np.searchsorted(neg, values, side="right")',
           'at_or_below = np.searchsorted(neg, values, side="left")',
           ("tests/unit/test_study.py",)),
    Mutant("AUROC interval without the normal images' variance", "fmjax/eval/intervals.py",
           "           + np.atleast_2d(np.cov(v_normal, ddof=1)) / v_normal.shape[1])",
           "           + 0.0)",
           ("tests/unit/test_intervals.py::test_the_interval_is_deLongs_from_every_pair",
            "tests/integration/test_cli.py::test_evaluate_then_predict")),
    Mutant("paired AUROC test ignores the two methods' covariance", "fmjax/eval/intervals.py",
           "cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]", "cov[0, 0] + cov[1, 1]",
           ("tests/unit/test_intervals.py::test_the_paired_test_is_deLongs_from_every_pair",)),
    Mutant("a one-class folder without masks refused", "fmjax/data/folder.py",
           "if missing and not (image_level and len(missing) == defects):", "if missing:",
           ("tests/unit/test_folder.py::test_a_category_without_any_mask_is_read_image_level_only_where_asked",
            "tests/integration/test_cli.py::test_evaluate_on_a_one_class_folder_without_masks")),
    Mutant("a mask missing beside others read as image-level data", "fmjax/data/folder.py",
           "if missing and not (image_level and len(missing) == defects):", "if missing and not image_level:",
           ("tests/unit/test_folder.py::test_one_missing_mask_beside_others_is_an_error_even_image_level",)),
    Mutant("a warning printed each time it is raised", "fmjax/app/cli.py",
           "if str(message) not in shown:", "if True:",
           ("tests/integration/test_cli.py::test_a_warning_prints_once_per_command",)),
    Mutant("blur matrix without the mirrored border", "fmjax/methods/maps.py",
           "source = _reflect(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], n)",
           "source = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1)",
           ("tests/unit/test_mismatch.py::test_smoothing_matches_scipy",)),
    # the core maths
    Mutant("velocity target sign flipped in the scorer", "fmjax/methods/flow_mismatch/scorer.py",
           "return path_point(eps[None], y[None], t[None])[0], target_velocity(eps, y)",
           "return path_point(eps[None], y[None], t[None])[0], target_velocity(y, eps)",
           ("tests/unit/test_mismatch.py",)),
    Mutant("time grid j / T instead of j / (T + 1)", "fmjax/methods/flow_mismatch/scorer.py",
           "(np.arange(1, num_times + 1) / (num_times + 1))",
           "(np.arange(1, num_times + 1) / num_times)",
           ("tests/unit/test_mismatch.py::test_scorer_equals_plain_loop_and_chunking_is_invisible",
            "tests/unit/test_mismatch.py::test_time_weights_and_average")),
    Mutant("order statistic off by one", "fmjax/methods/flow_mismatch/scorer.py",
           "return jnp.take(ordered, value - 1, axis=axis)",
           "return jnp.take(ordered, value, axis=axis)",
           ("tests/unit/test_mismatch.py",)),
    Mutant("AUPRO: PRO at the FPR limit not interpolated", "fmjax/eval/metrics.py",
           "pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)",
           "pro_at_limit = y1",
           ("tests/unit/test_metrics.py",)),
    Mutant("data-parallel step: gradients not summed over devices", "fmjax/training/step.py",
           "return psum_packed(jax.value_and_grad(shard_loss)(params), axis_name, PACKED_LEAF_SIZE if pack else 0)",
           "return jax.value_and_grad(shard_loss)(params)",
           ("tests/unit/test_train.py::test_one_and_two_devices_agree",)),
    Mutant("pmap step: every device takes the first shard's noise and times", "fmjax/training/step.py",
           "draws = slice_draws(draws, lax.axis_index(axis_name) * local, local)",
           "draws = slice_draws(draws, 0, local)",
           ("tests/unit/test_train.py::test_one_and_two_devices_agree",)),
    # RADAR
    Mutant("RADAR: q_sample without the square root on the signal", "fmjax/methods/radar/ddpm.py",
           "return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps",
           "return ab * x0 + jnp.sqrt(1.0 - ab) * eps",
           ("tests/unit/test_radar.py",)),
    Mutant("RADAR: Sobel magnitude of one axis only", "fmjax/methods/radar/scorer.py",
           "return jnp.sqrt(jnp.square(d_row) + jnp.square(d_col))",
           "return jnp.abs(d_col)",
           ("tests/unit/test_radar.py",)),
    # RADAR trains through the same step and update as flow matching: its own EMA test
    Mutant("RADAR: EMA update skipped", "fmjax/training/state.py",
           "params=params, ema_params=ema, opt_state=opt_state)",
           "params=params, ema_params=state.ema_params, opt_state=opt_state)",
           ("tests/unit/test_radar.py::test_ema_follows_its_formula",)),
    # flow reconstruction
    Mutant("recon: integration runs from 1 back to t0", "fmjax/methods/recon/scorer.py",
           "return integrate(velocity_fn, x0, float(t0), 1.0, steps, method)",
           "return integrate(velocity_fn, x0, 1.0, float(t0), steps, method)",
           ("tests/unit/test_recon.py",)),
    Mutant("recon: starts at time 1 - t0 on the path", "fmjax/methods/recon/scorer.py",
           "x0 = path_point(eps, y, jnp.full((y.shape[0],), t0, jnp.float32))",
           "x0 = path_point(eps, y, jnp.full((y.shape[0],), 1.0 - t0, jnp.float32))",
           ("tests/unit/test_recon.py",)),
    Mutant("learned map: read-out fitted with defect and normal pixels swapped", "fmjax/methods/flow_mismatch/learned.py",
           "y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]",
           "y = np.r_[np.ones(len(negatives)), np.zeros(len(positives))]",
           ("tests/unit/test_learned.py",)),
    Mutant("learned map: the learned rule scored without its read-out", "fmjax/methods/flow_mismatch/scorer.py",
           "maps = learned.learned_map(per_time_maps(delta, cfg.aggregate, cfg.smooth_sigma), feature_maps, stats,",
           "maps = learned.learned_map(per_time_maps(delta, cfg.aggregate, cfg.smooth_sigma), feature_maps, "
           "stats._replace(readout=jnp.ones_like(stats.readout)),",
           ("tests/integration/test_normalized_runs.py",)),
    Mutant("radar pixel statistics: fitted on the forest's half too", "fmjax/methods/radar/method.py",
           "arrays.update(standardize.fit(run.scorer.noise_maps(run.params, for_stats.images, for_stats.class_ids)))",
           "arrays.update(standardize.fit(run.scorer.noise_maps(run.params, holdout.images, holdout.class_ids)))",
           ("tests/unit/test_radar_standardize.py",)),
    Mutant("radar pixel statistics: the map not standardised", "fmjax/methods/radar/scorer.py",
           "        m = (m - pixel_mean) / pixel_std\n", "        m = m - 0 * pixel_mean\n",
           ("tests/unit/test_radar_standardize.py", "tests/integration/test_methods_cli.py")),
    Mutant("radar one-sided forest: the normals raised to their mean, not their median",
           "fmjax/methods/radar/forest.py", "x = np.maximum(x, np.median(x, axis=0))",
           "x = np.maximum(x, np.mean(x, axis=0))", ("tests/unit/test_radar_standardize.py",)),
    Mutant("radar map feature: the norm of the Sobel map, not of the noise map", "fmjax/methods/radar/scorer.py",
           "jnp.sqrt(jnp.sum(jnp.square(m), axis=(1, 2)))[:, None]",
           "jnp.sqrt(jnp.sum(jnp.square(s), axis=(1, 2)))[:, None]", ("tests/unit/test_radar_standardize.py",)),
    Mutant("radar choice: the worst setting", "fmjax/methods/radar/choice.py",
           "best = max(results, key=", "best = min(results, key=", ("tests/unit/test_radar_choice.py",)),
    Mutant("radar choice: the fit's forest scores its own half", "fmjax/methods/radar/choice.py",
           "for fit, test in ((\"A\", \"B\"), (\"B\", \"A\")):", "for fit, test in ((\"A\", \"A\"), (\"B\", \"B\")):",
           ("tests/unit/test_radar_choice.py",)),
    Mutant("radar memory bank: filled from the held-out normals", "fmjax/methods/radar/method.py",
           "run.scorer.features(run.params, images, class_ids), trained,",
           "run.scorer.features(run.params, images, class_ids), holdout,",
           ("tests/integration/test_methods_cli.py::"
            "test_radar_with_pixel_statistics_map_feature_and_memory_bank_exports_alike",)),
    Mutant("radar memory bank: features read at the flow's clean end (t = 1)", "fmjax/methods/radar/method.py",
           "conditional=False, clean_time=0.0)", "conditional=False, clean_time=1.0)",
           ("tests/unit/test_features.py",)),
    Mutant("radar memory bank: the distance to the nearest row only", "fmjax/methods/radar/scorer.py",
           "image_bank.Bank(*bank),\n                                            settings.feature_knn)",
           "image_bank.Bank(*bank), 1)",
           ("tests/integration/test_methods_cli.py::"
            "test_radar_with_pixel_statistics_map_feature_and_memory_bank_exports_alike",)),
    Mutant("feature bank: its whitening ignored when scoring", "fmjax/methods/image_bank.py",
           "return ((features - bank.mean) / bank.std) @ bank.whiten", "return (features - bank.mean) / bank.std",
           ("tests/unit/test_features.py",)),
    Mutant("feature grid: the cells averaged over the wrong axes", "fmjax/methods/image_bank.py",
           ".mean(axis=(2, 4))", ".mean(axis=(1, 3))", ("tests/unit/test_features.py",)),
    Mutant("flow mismatch: score.feature_whiten never reaches its bank", "fmjax/methods/flow_mismatch/method.py",
           "settings.seed, settings.feature_whiten)", "settings.seed)",
           ("tests/integration/test_workflow.py::"
            "test_exported_scorer_carries_the_normalisation_statistics_and_feature_bank",)),
    Mutant("flow mismatch: score.patch_whiten never reaches the feature map's bank",
           "fmjax/methods/flow_mismatch/method.py", "rows.shape[-1]), settings.patch_whiten)", "rows.shape[-1]))",
           ("tests/unit/test_features.py::test_patch_whiten_whitens_the_feature_maps_bank_before_its_coreset",)),
    Mutant("select_features: a stage chooses on the image AUROC whatever its criterion",
           "experiments/select_features.py",
           'table.setdefault(key(row), {})[result["set"]] = row[criterion]',
           'table.setdefault(key(row), {})[result["set"]] = row["image_auroc"]', ("tests/unit/test_selection.py",)),
    Mutant("runs: the chosen settings not applied before the fit", "fmjax/runs.py",
           "run.config, run._scorer = run.config.replace(score=settings), None", "pass",
           ("tests/integration/test_methods_cli.py::test_radar_chooses_its_timestep_and_blur_on_the_held_out_normals",)),
    Mutant("config: settings added since overrule what a whole config.json was written with", "fmjax/config.py",
           "score = {**registry.written_before(method), **score}",
           "score = {**score, **registry.written_before(method)}", ("tests/unit/test_config.py",)),
    Mutant("radar choice: every candidate read at the settings' own timestep", "fmjax/methods/radar/scorer.py",
           "self.noise, *timestep(self.config, t_score))[0]", "self.noise, *timestep(self.config))[0]",
           ("tests/unit/test_radar_choice.py",)),
    Mutant("evaluate: the maps skipped although the test split has defect masks", "fmjax/app/evaluate.py",
           "with_maps = bool(maps_dir or pictures_dir) or has_defect_pixels(test)",
           "with_maps = bool(maps_dir or pictures_dir)",
           ("tests/integration/test_workflow.py::"
            "test_logdir_holds_the_training_log_and_the_metrics_as_tensorboard_events",)),
    Mutant("image scores without maps: the bank's nearest row only", "fmjax/methods/flow_mismatch/scorer.py",
           "functools.partial(feat.knn_scores, k=self.config.feature_knn)", "functools.partial(feat.knn_scores, k=1)",
           ("tests/unit/test_features.py::test_scorer_scores_images_by_feature_distance_and_keeps_its_maps",)),
]

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]


def copy_tree(dest: str) -> None:
    """The working tree's tracked and untracked, not ignored files -> dest."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):  # a tracked file deleted in the working tree is left out
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def environment(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [copy, env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode between a mutant and the restored file
    return env


def run_tests(copy: str, tests, timeout: float):
    """(pytest exit code or None on timeout, seconds, output tail) of `tests` in the copy."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(PYTEST + list(tests), cwd=copy, env=environment(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, ""
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-3000:]


def outcome(code, output: str) -> str:
    """caught: a test failed; NOT CAUGHT: all passed; error: anything else (a collection or
    fixture error, the time limit). With `-x` under pytest-xdist a failure ends the run
    with exit code 2 (interrupted), so the summary line decides."""
    if code is None:
        return "error: time limit"
    if code == 0:
        return "NOT CAUGHT"
    summaries = [line for line in output.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    summary = summaries[-1] if summaries else ""
    if re.search(r"\b\d+ failed\b", summary) and not re.search(r"\b\d+ errors?\b", summary):
        return "caught"
    return f"error: pytest exit code {code}"


@dataclasses.dataclass
class Edit:
    """One file of the copy, replaced for the duration of a `with` block."""

    copy: str
    rel: str
    pattern: str
    replacement: str

    def count(self) -> int:
        with open(os.path.join(self.copy, self.rel)) as f:
            return f.read().count(self.pattern)

    def __enter__(self):
        path = os.path.join(self.copy, self.rel)
        with open(path) as f:
            self.original = f.read()
        with open(path, "w") as f:
            f.write(self.original.replace(self.pattern, self.replacement, 1))
        return self

    def __exit__(self, *exc):
        with open(os.path.join(self.copy, self.rel), "w") as f:
            f.write(self.original)


def check_copy_is_imported(copy: str, timeout: float) -> None:
    """The copy's fmjax is what Python and the tests import: its path, and a copy whose
    fmjax/__init__.py raises makes a test run fail with that error."""
    found = subprocess.run([sys.executable, "-c", "import fmjax; print(fmjax.__file__)"], cwd=copy,
                           env=environment(copy), capture_output=True, text=True, check=True).stdout.strip()
    if os.path.realpath(os.path.dirname(os.path.dirname(found))) != os.path.realpath(copy):
        raise SystemExit(f"the copy is not what Python imports: fmjax comes from {found}")
    marker = "fmjax-mutants-canary"
    with open(os.path.join(copy, "fmjax", "__init__.py")) as f:
        text = f.read()  # raised at the end: a `from __future__` import must stay first
    with Edit(copy, "fmjax/__init__.py", text, text + f"\nraise ImportError({marker!r})\n"):
        code, _, output = run_tests(copy, ["tests/unit/test_scalars.py"], timeout)
    if code in (0, None) or marker not in output:
        raise SystemExit("a copy whose fmjax cannot be imported did not fail the tests: they import another fmjax")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only.lower() in m.name.lower()]
    if args.list or not mutants:
        for m in mutants:
            print(f"{m.name}\n  {m.file}: {m.pattern!r} -> {m.replacement!r}\n  tests: {' '.join(m.tests)}")
        return 0 if mutants else 2

    copy = tempfile.mkdtemp(prefix="fmjax-mutants-")
    rows, failed = [], False
    try:
        copy_tree(copy)
        check_copy_is_imported(copy, args.timeout)
        print(f"copy: {copy} (imported by the tests: checked)", flush=True)
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            code, seconds, output = run_tests(copy, tests, args.timeout)
            if code != 0:
                print(output)
                raise SystemExit(f"the named tests do not pass on the unmutated copy (exit code {code})")
            print(f"baseline: the named tests pass unmutated ({seconds:.0f} s)", flush=True)
        for m in mutants:
            edit = Edit(copy, m.file, m.pattern, m.replacement)
            count = edit.count()
            if count != 1:
                result, seconds = f"error: pattern found {count} times", 0.0
            else:
                with edit:
                    code, seconds, output = run_tests(copy, m.tests, args.timeout)
                result = outcome(code, output)
                if result.startswith("error"):
                    print(output)
            failed |= result != "caught"
            rows.append((m, result, seconds))
            print(f"{result:>10}  {seconds:5.0f} s  {m.name}", flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    print("\n| mutant | file | tests run | result | s |\n|---|---|---|---|---|")
    for m, result, seconds in rows:
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        print(f"| {m.name} | {m.file} | {tests} | {result} | {seconds:.0f} |")
    print(f"\n{sum(r == 'caught' for _, r, _ in rows)} of {len(rows)} mutants caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
