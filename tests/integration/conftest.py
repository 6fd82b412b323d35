"""Fixtures of the command-line tests: the tiny MVTec-layout tree."""
import pytest
from helpers import make_tree


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))
