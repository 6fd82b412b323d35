"""The run folder's lock: a second writer is refused with the holder's name, even when it
asks in the moment between the holder taking the lock and writing who it is."""
import fcntl
import json
import os
import socket
import threading

import pytest

from fmjax import runs
from fmjax.errors import RunError


def _take(run_dir):
    fd = os.open(os.path.join(run_dir, runs.LOCK), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _write_holder(fd):
    os.pwrite(fd, json.dumps({"command": "train", "pid": 4242, "host": socket.gethostname(),
                              "since": "2026-01-01T00:00:00"}).encode(), 0)


@pytest.mark.parametrize("delay_s", [0.0, 0.3])
def test_a_held_folder_names_its_holder_even_before_the_holder_wrote_itself(tmp_path, delay_s):
    fd = _take(tmp_path)
    writer = threading.Timer(delay_s, _write_holder, args=(fd,))
    writer.start()
    try:
        with pytest.raises(RunError, match=r"in use by fmjax train \(process 4242 on "):
            with runs.lock(str(tmp_path), "evaluate"):
                pass
    finally:
        writer.join()
        os.close(fd)


def test_a_holder_that_never_writes_itself_is_named_generically_after_a_short_wait(tmp_path):
    fd = _take(tmp_path)
    try:
        with pytest.raises(RunError, match="in use by another fmjax process"):
            with runs.lock(str(tmp_path), "evaluate"):
                pass
    finally:
        os.close(fd)
