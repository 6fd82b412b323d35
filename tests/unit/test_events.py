"""TensorBoard event files (fmjax.eval.events) and the learning rate they log."""
import sys

import optax
import pytest

from fmjax.config import TrainConfig
from fmjax.errors import ConfigError
from fmjax.training.state import learning_rate

events = pytest.importorskip("fmjax.eval.events")
pytest.importorskip("tensorboardX")


def test_scalars_are_read_back_as_written(tmp_path):
    with events.EventLog(str(tmp_path)) as log:
        log.scalars("train", {"loss": 0.5, "grad_norm": 2, "nan": float("nan"), "name": "x", "flag": True}, 10)
        log.scalars("train", {"loss": 0.25}, 20)
    assert events.read_scalars(str(tmp_path)) == {"train/loss": [(10, 0.5), (20, 0.25)], "train/grad_norm": [(10, 2.0)]}


def test_a_missing_tensorboardx_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match=r"fmjax\[tensorboard\]"):
        events.EventLog(str(tmp_path / "logs"))


@pytest.mark.parametrize("warmup", [0, 4])
def test_learning_rate_is_the_optimizers_schedule(warmup):
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=warmup)
    schedule = optax.linear_schedule(0.0, 1e-3, max(warmup, 1)) if warmup else (lambda step: 1e-3)
    for step in range(8):
        assert learning_rate(cfg, step) == pytest.approx(float(schedule(step)))
