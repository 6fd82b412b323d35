"""Paths built from input stay inside their root; files are written whole or not at all;
output folders are published whole, replacing (never merging into) an earlier fmjax
output and refusing a folder fmjax did not write; what a killed process left is removed."""
import errno
import json
import os
import subprocess
import sys

import pytest

from fmjax.errors import DataError, OutputError, describe
from fmjax.files import OUTPUT_MARK, Outputs, inside, plain_name, remove_stale, temp_path, write_text_atomic, writing


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
    assert os.listdir(tmp_path) == ["x.json"]


def test_outputs_are_published_together_and_replace_earlier_ones(tmp_path):
    maps, metrics = tmp_path / "maps", tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with Outputs() as out:
            stage = out.folder(str(maps), "--maps-out")
            open(os.path.join(stage, "part.tiff"), "w").close()
            out.json(str(metrics), {"auroc": 1.0})
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []  # nothing published, nothing staged left
    with Outputs() as out:
        os.makedirs(os.path.join(out.folder(str(maps)), "a"))
        open(os.path.join(out.folder(str(tmp_path / "pictures")), "p.png"), "w").close()
        out.json(str(metrics), {"run": 1})
    assert sorted(os.listdir(tmp_path)) == ["maps", "metrics.json", "pictures"]
    assert sorted(os.listdir(maps)) == [OUTPUT_MARK, "a"]
    open(maps / "a" / "old.tiff", "w").close()
    with Outputs() as out:  # a second output replaces the first as a whole
        open(os.path.join(out.folder(str(maps)), "new.tiff"), "w").close()
        out.json(str(metrics), {"run": 2})
    assert sorted(os.listdir(maps)) == [OUTPUT_MARK, "new.tiff"] and json.loads(metrics.read_text()) == {"run": 2}
    assert sorted(os.listdir(tmp_path)) == ["maps", "metrics.json", "pictures"]


def test_outputs_refuse_folders_fmjax_did_not_write(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.png").write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    out = Outputs()
    with pytest.raises(OutputError, match="did not write"):
        out.folder(str(tmp_path / "photos"), "--out")
    with pytest.raises(OutputError, match="is a file"):
        out.folder(str(tmp_path / "file"), "--out")
    out.folder(str(tmp_path / "new"), "--maps-out")
    with pytest.raises(OutputError, match="also another output"):
        out.folder(str(tmp_path / "new"), "--pictures-out")
    out.discard()
    assert sorted(os.listdir(tmp_path)) == ["file", "photos"] and os.listdir(tmp_path / "photos") == ["holiday.png"]


def test_errors_name_the_path_and_the_cause(tmp_path):
    with pytest.raises(OSError) as caught:
        with writing(str(tmp_path / "metrics.json")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert describe(caught.value) == f"{tmp_path / 'metrics.json'}: No space left on device " \
                                     f"(free some space there or write elsewhere)"
    with pytest.raises(OSError) as caught:  # an error inside a staged folder names the destination
        with Outputs() as out:
            stage = out.folder(str(tmp_path / "maps"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(stage, "x.tiff"))
    assert caught.value.filename == str(tmp_path / "maps") and os.listdir(tmp_path) == []


def test_what_a_killed_process_left_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    mine = temp_path(str(tmp_path / "metrics.json"))
    left = [temp_path(str(tmp_path / "maps"), "stage"), temp_path(str(tmp_path / "metrics.json"))]
    for i, name in enumerate(left):
        name = name.replace(f"-{os.getpid()}-", f"-{pid}-")
        os.mkdir(name) if i == 0 else open(name, "w").close()
    open(mine, "w").close()
    (tmp_path / ".fmjax-stage-1-00000000-maps").mkdir()  # another host's: cannot tell, kept
    assert len(remove_stale(str(tmp_path))) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), ".fmjax-stage-1-00000000-maps"])
