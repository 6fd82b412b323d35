"""TensorBoard event files (fmjax.eval.events) and the learning rate they log."""
import sys

import pytest

from fmjax.errors import ConfigError

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
