"""What the tests share: a tiny dataset in MVTec layout written by the tests themselves,
running the command line in-process, one-line error checks, dataset comparisons, and the
environment of a child Python with a chosen number of host devices."""
import csv
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a tiny MVTec-layout tree

H, W = 20, 24  # every source image is 24 wide, 20 high
SIZE = 16
CATEGORY = "widget"
SQUARES = {"000": (3, 4), "001": (7, 12), "002": (12, 2)}  # crack id -> (top, left) of the 6x6 defect
# a quarter of the 12 training normals held out: 3 images, so their quantiles differ; a
# learning rate at which 4 steps move the params well away from their EMA
TRAIN_ARGS = ["--preset", "tiny", "--set", "train.steps=4", "--set", f"data.image_size={SIZE}",
              "--set", "calibration.holdout_fraction=0.25", "--set", "train.learning_rate=0.01", "--no-progress"]
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
TEST_IDS = [("crack", i) for i in sorted(SQUARES)] + [("good", f"{i:03d}") for i in range(3)]


def image(seed, square=None):
    """RGB uint8 [H, W, 3]: horizontal waves (phase varies with seed) plus noise; an optional
    bright 6x6 square at (top, left)."""
    rng = np.random.default_rng(seed)
    xx = np.arange(W)[None, :, None]
    wave = 60.0 * np.sin(xx / 4.0 + 0.3 * seed) * np.array([1.0, 0.8, 0.6])
    out = 128.0 + wave + rng.normal(0.0, 6.0, (H, W, 3))
    if square is not None:
        top, left = square
        out[top:top + 6, left:left + 6] = 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_tree(root, category=CATEGORY):
    """ROOT/<category>/{train/good (12), test/good (3), test/crack (3), ground_truth/crack (3 masks)}."""
    cat = root / category
    for i in range(12):
        save_png(cat / "train/good" / f"{i:03d}.png", image(i))
    for i in range(3):
        save_png(cat / "test/good" / f"{i:03d}.png", image(100 + i))
    for k, (name, (top, left)) in enumerate(sorted(SQUARES.items())):
        save_png(cat / "test/crack" / f"{name}.png", image(200 + k, (top, left)))
        mask = np.zeros((H, W), np.uint8)
        mask[top:top + 6, left:left + 6] = 255
        save_png(cat / "ground_truth/crack" / f"{name}_mask.png", mask)
    return root


# ----------------------------------------------------------------------------- the command line

def cli(capsys, *argv):
    """(exit code, stdout, stderr) of the command line run in this process."""
    from fmjax.app.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fmjax"), err


def image_scores_csv(path):
    """Rows of an evaluate `image_scores.csv`: {image: (label, score, anomalous)}."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["image", "label", "score", "anomalous"]
        return {image: (int(label), float(score), anomalous) for image, label, score, anomalous in reader}


def assert_image_metrics_from_csv(rows, metrics):
    """The exported image scores give the reported image metrics (sklearn recomputes them)."""
    labels = np.array([label for label, _, _ in rows.values()])
    scores = np.array([score for _, score, _ in rows.values()])
    assert roc_auc_score(labels, scores) == pytest.approx(metrics["image_auroc"], abs=1e-12)
    assert average_precision_score(labels, scores) == pytest.approx(metrics["image_ap"], abs=1e-12)
    # DeLong's 95% interval, from every (anomalous, normal) pair of the exported scores
    from scipy import special

    from tests.references import delong_by_definition

    auroc, cov = delong_by_definition(scores, labels)
    half = special.ndtri(0.975) * np.sqrt(cov[0, 0])
    assert metrics["image_auroc_ci95"] == pytest.approx([max(0.0, auroc[0] - half), min(1.0, auroc[0] + half)], abs=1e-9)


def other_metrics(run_dir):
    """The one metrics-*.json an evaluation of other data or settings wrote in `run_dir`
    (the run's own metrics.json is never overwritten by one)."""
    import json

    written = sorted(run_dir.glob("metrics-*.json"))
    assert len(written) == 1, written
    return json.loads(written[0].read_text())


def metric_values(metrics):
    return {k: metrics[k] for k in METRIC_KEYS}


def fixture_mask(name):
    """Ground truth of test image `name` ("test/crack/001") at its original size, from the
    squares the fixture pasted (not from the mask files)."""
    _, defect, ident = name.split("/")
    mask = np.zeros((H, W), np.uint8)
    if defect != "good":
        top, left = SQUARES[ident]
        mask[top:top + 6, left:left + 6] = 1
    return mask


def assert_pixel_metrics_from_tiffs(category_dir, metrics):
    """The reported pixel metrics and AUPRO, recomputed from the written TIFF maps and the
    fixture's squares: scikit-learn for AUROC, AP and F1-max, a brute-force AUPRO."""
    import tifffile
    from references import brute_force_aupro, sklearn_f1_max

    names = sorted(p.relative_to(category_dir).with_suffix("").as_posix() for p in category_dir.rglob("*.tiff"))
    assert names == sorted(f"test/{defect}/{ident}" for defect, ident in TEST_IDS)
    maps = [tifffile.imread(category_dir / f"{name}.tiff") for name in names]
    masks = [fixture_mask(name) for name in names]
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert metrics["pixel_f1_max"] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-9)
    assert metrics["aupro"] == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-9)


def run_config(run_dir, overrides=()):
    """A run folder's config with `overrides` applied."""
    from fmjax.config import Config, apply_overrides

    return apply_overrides(Config.from_json((run_dir / "config.json").read_text()), list(overrides))


def load_test_split(run_dir, data_root):
    """The test split at the run's resolution (the reader's arrays)."""
    from fmjax import data as data_lib

    return data_lib.load(f"folder:{data_root}", CATEGORY, run_config(run_dir).data).test


def reference_run_scores(run_dir, images, labels=None, overrides=(), ema=True):
    """Maps [N,H,W] and image scores [N] of a trained run's network, by the definition of
    Flow Mismatching with the numpy U-Net (tests/references.py) on the restored EMA params
    (or the raw ones), the run's scoring settings with `overrides`."""
    import jax
    from references import NumpyUNet, reference_scores, unet_velocity

    from fmjax.training.checkpoints import restore_state

    config = run_config(run_dir, overrides)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = restore_state(str(run_dir), config, shape)
    net = NumpyUNet(config.net, jax.device_get(state.ema_params if ema else state.params))
    return reference_scores(unet_velocity(net), images, config.score, labels)


def csv_scores(rows, names):
    return np.array([rows[name][1] for name in names])


# ----------------------------------------------------------------------------- child processes

# what makes fmjax.distributed.multihost.maybe_initialize_distributed start a multi-process run
DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                    "FMJAX_DISTRIBUTED", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                    "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


# XLA:CPU flags that only make compiling several times quicker; tests compare paths under
# the same flags, and a tiny model's test is mostly compilation
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_use_xnnpack=false"


def subprocess_env(num_devices, fast_compile=True, **extra):
    """Environment for a child python with `num_devices` host devices, whatever this session
    forced, importing this checkout's fmjax; `fast_compile` adds flags that only make the
    CPU compile several times quicker (the same flags for every path compared)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    if fast_compile:
        env["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- datasets


def assert_same(a, b):
    """Two Datasets hold identical arrays, labels, names and masks."""
    assert (a.category, a.name) == (b.category, b.name)
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        for field in ("images", "masks", "labels", "original_sizes"):
            x, y = getattr(split_a, field), getattr(split_b, field)
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), field
        assert split_a.names == split_b.names and split_a.defect_types == split_b.defect_types
        assert (split_a.full_masks is None) == (split_b.full_masks is None)
        for x, y in zip(split_a.full_masks or [], split_b.full_masks or []):
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all()


# Preamble for subprocess scripts that check TFDS reads work without importing TensorFlow:
# it records every real attempt to import tensorflow in the list `attempts`.
TENSORFLOW_IMPORT_RECORDER = r"""
import importlib.abc, json, sys, traceback

attempts = []


class Recorder(importlib.abc.MetaPathFinder):
    # Records every attempt to import tensorflow; importlib.util.find_spec probes
    # (libraries asking whether it is installed) are not imports and are ignored.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            probe = any(f.name == "find_spec" and "importlib" in f.filename and "util" in f.filename
                        for f in traceback.extract_stack())
            if not probe:
                attempts.append(name)
        return None


sys.meta_path.insert(0, Recorder())
"""
