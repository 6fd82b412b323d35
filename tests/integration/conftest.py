"""Fixtures of the command-line tests: the tiny MVTec-layout tree and a run trained on it."""
import shutil

import pytest
from helpers import CATEGORY, TRAIN_ARGS, make_tree


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """A run trained once through the CLI; tests that write into a run use a copy."""
    from fmjax.app.cli import main

    run = tmp_path_factory.mktemp("runs") / "widget_run"
    code = main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run), *TRAIN_ARGS])
    assert code == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest
