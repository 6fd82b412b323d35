"""Files written whole or not at all, output folders published whole, and paths built from
input kept inside their root.

Every temporary name fmjax writes is `.fmjax-<kind>-<pid>-<host>-<rest>` (kind: tmp, stage,
old), so what a killed process left behind is recognised and removed by the next one
(`remove_stale`): a name of this host whose process has ended.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import uuid

from fmjax.errors import DataError, OutputError

__all__ = ["OUTPUT_MARK", "Outputs", "inside", "plain_name", "process_alive", "remove_stale", "sha256_of", "temp_path",
           "write_bytes_with", "write_json", "write_text_atomic", "writing"]

OUTPUT_MARK = ".fmjax-output"  # in every output folder fmjax publishes: it may replace that folder
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.fmjax-(tmp|stage|old)-(\d+)-([0-9a-f]{8})-")


def sha256_of(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_path(path: str, kind: str = "tmp") -> str:
    """A fresh temporary name beside `path` (see the module docstring)."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".fmjax-{kind}-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}-{base}")


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: str) -> list[str]:
    """Removes the temporary files and folders in `folder` that processes of this host left
    when they were killed (their process has ended); returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if not match or match.group(3) != _HOST or process_alive(int(match.group(2))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(name)
    return removed


@contextlib.contextmanager
def writing(path: str):
    """Names `path` in an OSError raised inside that names no file (a full disk while
    writing, for one), so the message says where it happened."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), path) from None
        raise


@contextlib.contextmanager
def _replacing(path: str):
    """Yields a temporary file name beside `path`; renames it over `path` on success and
    removes it on failure."""
    tmp = temp_path(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to a temp file beside `path`, then renames it over `path`; the temp
    file is removed if anything fails."""
    with _replacing(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented, key-sorted JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_bytes_with(path: str, write) -> None:
    """Calls write(binary file) on a temp file beside `path`, then renames it over `path`."""
    with _replacing(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


class Outputs:
    """Output folders and files written as a whole: each folder is staged beside its
    destination, each file written to a temp name beside it; `publish` moves the folders
    into place (an existing folder is replaced, never merged into, when it is empty or fmjax
    wrote it, and refused otherwise) and then the files, in the order they were asked
    for. On failure everything staged is removed. Used as a context manager: it publishes
    when the block ends without an error.

        with Outputs() as out:
            maps_dir = out.folder(maps_out, "--maps-out")   # write the maps there
            out.json(metrics_path, metrics)                   # published after the folders
    """

    def __init__(self):
        self._folders, self._files = [], []

    def folder(self, dest: str | None, what: str = "output folder") -> str | None:
        """A staging folder for `dest` (None when dest is None); refuses at once a dest
        that cannot be replaced."""
        if dest is None:
            return None
        dest = os.path.realpath(dest)
        if any(d == dest for _, d, _ in self._folders):
            raise OutputError(f"{what} {dest} is also another output of this command: choose separate folders")
        _check_replaceable(dest, what)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent)
        stage = temp_path(dest, "stage")
        with writing(parent):
            os.mkdir(stage)
            open(os.path.join(stage, OUTPUT_MARK), "w").close()
        self._folders.append((stage, dest, what))
        return stage

    def json(self, dest: str, obj) -> None:
        """`obj` as JSON for `dest`, published after every folder."""
        tmp = temp_path(dest)
        self._files.append((tmp, dest))
        with writing(dest), open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True))

    def publish(self) -> None:
        for stage, dest, what in self._folders:
            _check_replaceable(dest, what)
            old = temp_path(dest, "old") if os.path.exists(dest) else None
            with writing(dest):
                if old:
                    os.rename(dest, old)
                os.rename(stage, dest)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        for tmp, dest in self._files:
            with writing(dest):
                os.replace(tmp, dest)
        self._folders, self._files = [], []

    def discard(self) -> None:
        for stage, _, _ in self._folders:
            shutil.rmtree(stage, ignore_errors=True)
        for tmp, _ in self._files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._folders, self._files = [], []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            try:
                self.publish()
            finally:
                self.discard()
            return
        where = ", ".join(dest for _, dest, _ in self._folders) or ", ".join(dest for _, dest in self._files)
        self.discard()
        if isinstance(err, OSError) and where and (err.filename is None or ".fmjax-" in str(err.filename)):
            raise OSError(err.errno, err.strerror or str(err), where) from None


def _check_replaceable(dest: str, what: str) -> None:
    """OutputError unless `dest` is absent, an empty folder or a folder fmjax published."""
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest):
        raise OutputError(f"{what} {dest} is a file: choose a folder")
    try:
        names = os.listdir(dest)
    except OSError as err:
        raise OSError(err.errno, err.strerror, dest) from None
    if names and OUTPUT_MARK not in names:
        raise OutputError(f"{what} {dest} holds files fmjax did not write: choose a new or empty folder "
                          f"(an earlier fmjax output there is replaced as a whole)")


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

