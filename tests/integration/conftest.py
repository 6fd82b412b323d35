"""Fixtures of the command-line tests: the tiny MVTec-layout tree, and a copy of the run
the requesting module trains (its `trained_run` fixture) that a test may change."""
import shutil

import pytest
from helpers import make_tree


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest
