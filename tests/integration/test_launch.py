"""How programs start (`fmjax.app.launch.start`), through the real entry point in a child
process: any number of host devices trains the tiny preset's batch of 8 (on the largest
number of devices that divides it) with the loss of one device, whether the device count
comes from --devices or from XLA_FLAGS."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, subprocess_env

ARGS = ["--data", "textures:brick", "--preset", "tiny", "--set", "train.steps=3", "--set", "train.log_every=1",
        "--set", "calibration.holdout_fraction=0", "--no-progress"]


def _train(tmp_path, name, prefix=(), suffix=(), devices=None):
    env = subprocess_env(devices or 1)
    if devices is None:  # the count comes from --devices
        env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    env["FMJAX_ALLOCATOR"] = "system"
    out = tmp_path / name
    result = subprocess.run([sys.executable, "-m", "fmjax.app.cli", *prefix, "train", *ARGS, "--out", str(out),
                             *suffix], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The same training on one device, in this process."""
    import jax

    from fmjax.app.train import train_run
    from fmjax.config import build

    out = tmp_path_factory.mktemp("one") / "run"
    sets = [ARGS[i + 1] for i, a in enumerate(ARGS) if a == "--set"]
    train_run(build("tiny", "flow_mismatch", sets), "textures:brick", None, str(out), progress=False,
              devices=jax.local_devices()[:1])
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()]


@pytest.mark.parametrize("how", ["flag", "xla_flags"])
def test_any_device_count_trains_the_batch_with_the_loss_of_one_device(how, one_device, tmp_path):
    if how == "flag":  # after the command (before it: test_cli.py), a batch of 8 on 2 of 3 devices
        losses = _train(tmp_path, "run", suffix=["--devices", "3"])
    else:
        losses = _train(tmp_path, "run", devices=6)  # on 4 of the 6
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, one_device, rtol=1e-5, atol=1e-6)


def test_start_leaves_a_process_that_already_uses_jax_alone():
    import jax

    from fmjax.app import launch

    before = jax.local_device_count()
    launch.start(devices=5, distributed=False)
    assert jax.local_device_count() == before
    assert "LD_PRELOAD" not in os.environ or "tcmalloc" not in os.environ.get("LD_PRELOAD", "")
