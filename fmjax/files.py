"""Files written whole or not at all, and paths built from input kept inside their root."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from fmjax.errors import DataError

__all__ = ["inside", "plain_name", "staged_dir", "write_json", "write_text_atomic"]


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to a temp file beside `path`, then renames it over `path`; the temp
    file is removed if anything fails."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented, key-sorted JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


@contextlib.contextmanager
def staged_dir(path: str):
    """Yields a temp folder next to `path`; on success its files are moved into `path`,
    on failure it is removed, so `path` never holds half-written output."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fmjax-", dir=parent)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            dest_root = os.path.join(path, os.path.relpath(root, tmp))
            os.makedirs(dest_root, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(dest_root, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain_name(name, what: str = "name") -> str:
    """`name` if it is one plain path component (not empty, '.' or '..', no separator, no
    NUL, not absolute); DataError naming `what` otherwise."""
    text = str(name)
    seps = [s for s in (os.sep, os.altsep, "/", "\\") if s]
    if (not text or text in (".", "..") or "\0" in text or any(s in text for s in seps)
            or os.path.isabs(text)):
        raise DataError(f"{what} {text!r} must be a plain name (no '..', no '/', not absolute)")
    return text


def inside(root, relative: str, what: str = "path") -> str:
    """root/relative, after checking that it stays inside `root` once symbolic links are
    followed (`relative` may hold several plain components, e.g. 'test/crack/001');
    DataError otherwise."""
    parts = str(relative).replace("\\", "/").split("/")
    for part in parts:
        plain_name(part, what)
    path = os.path.join(os.fspath(root), *parts)
    real_root = os.path.realpath(os.fspath(root))
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise DataError(f"{what} {relative!r} leads outside {root} (through a symbolic link): "
                        f"use a folder inside it")
    return path
