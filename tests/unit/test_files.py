"""Paths built from input stay inside their root; files are written whole or not at all."""
import os

import pytest

from fmjax.errors import DataError
from fmjax.files import inside, plain_name, staged_dir, write_text_atomic


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../a", "/etc", "a\\b", "a\0b"])
def test_plain_names_refuse_everything_but_one_component(name):
    with pytest.raises(DataError, match="plain name"):
        plain_name(name, "--category")


def test_inside_follows_links_and_refuses_what_leaves_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "stay").symlink_to(root / "a", target_is_directory=True)
    assert inside(root, "a/b/c.tiff") == os.path.join(root, "a", "b", "c.tiff")
    assert inside(root, "stay/b") == os.path.join(root, "stay", "b")  # a link within the root is fine
    for bad in ("escape", "escape/x.tiff", "../outside", "a/../../outside", "/abs"):
        with pytest.raises(DataError):
            inside(root, bad)


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    path = tmp_path / "x.json"
    write_text_atomic(str(path), "one")
    assert path.read_text() == "one" and os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(FileNotFoundError):
        write_text_atomic(str(tmp_path / "missing" / "x.json"), "two")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(str(out)) as tmp:
            (open(os.path.join(tmp, "part.txt"), "w")).close()
            raise RuntimeError("stop")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["x.json"]
    with staged_dir(str(out)) as tmp:
        os.makedirs(os.path.join(tmp, "a"))
        open(os.path.join(tmp, "a", "done.txt"), "w").close()
    assert os.listdir(out / "a") == ["done.txt"] and sorted(os.listdir(tmp_path)) == ["out", "x.json"]
