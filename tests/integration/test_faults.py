"""Fault injection on the command line: run folders another process holds (and one a killed
process left locked), settings that cannot work, a full disk (a small tmpfs, where this
machine allows mounting one), a process killed during evaluate, damaged run folders, an
existing --maps-out, and the environment of a cluster job. Each case must end in one
error line with exit code 2 (or succeed), and leave no half-written output and no
temporary file behind."""
import errno
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from helpers import CATEGORY, ROOT, TRAIN_ARGS, assert_one_line_error, cli, image_scores_csv, subprocess_env

from fmjax.app.cli import main


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", str(run),
                 *TRAIN_ARGS]) == 0
    return run


def _temporaries(*folders):
    """fmjax's temporary names (and orbax's unfinished saves) under `folders`; neither the
    lock file a command holds nor the mark of an fmjax output folder is one."""
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            found += [os.path.join(root, n) for n in dirs + files 
                      if (n.startswith(".fmjax-") or "tmp" in n) and n not in (".fmjax-lock", ".fmjax-output")]
    return found



def _tiny_state():
    """A stand-in for the training state that `save_state` hands to a fake manager."""
    return types.SimpleNamespace(step=7, params={"x": np.zeros(3, np.float32)}, ema_params={}, opt_state=())


def _child(code, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env or subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ----------------------------------------------------------------------------- two processes, one folder

HOLDER = """
import datetime, fcntl, json, os, socket, sys, time
from fmjax.files import temp_path
run = sys.argv[1]
fd = os.open(os.path.join(run, ".fmjax-lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"command": "train", "pid": os.getpid(), "host": socket.gethostname(),
                         "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
open(temp_path(os.path.join(run, "metrics.json")), "w").close()  # as if killed while writing it
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_another_process_holds_is_refused_and_a_killed_holders_lock_taken_over(run_copy, data_root,
                                                                                         tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], cwd=ROOT, env=subprocess_env(1),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        maps, out = tmp_path / "maps", tmp_path / "predictions"
        busy = f"in use by fmjax train (process {holder.pid} on {socket.gethostname()}"
        for argv in (["evaluate", "--run", run_copy, "--maps-out", maps],
                     ["predict", "--run", run_copy, "--input", data_root / CATEGORY / "test" / "good", "--out", out],
                     ["train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", run_copy,
                      "--resume", *TRAIN_ARGS],
                     ["calibrate", "--run", run_copy, "--set", "score.num_paths=2"]):
            code, _, err = cli(capsys, *argv)
            assert_one_line_error(code, err)
            assert busy in err, err
        assert not maps.exists() and not out.exists() and not (run_copy / "metrics.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert len(_temporaries(run_copy)) == 1  # what the killed holder was writing
    code, _, err = cli(capsys, "evaluate", "--run", run_copy)
    assert code == 0, err
    assert f"was left locked by fmjax train (process {holder.pid}" in err and "taking it over" in err
    assert (run_copy / "metrics.json").exists()
    assert not (run_copy / ".fmjax-lock").exists() and _temporaries(run_copy) == []


def test_two_trainers_on_one_out(data_root, tmp_path):
    """Two `fmjax train` processes started together on one --out: one trains, the other
    ends with one line (the folder is in use, or already holds that run's checkpoints)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fmjax.app.cli", "train", "--data", f"folder:{data_root}", "--category", CATEGORY,
            "--out", str(out), *TRAIN_ARGS, "--set", "train.log_every=1"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(1, FMJAX_ALLOCATOR="system"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(err for code, err in results if code == 2)
    assert len(err.strip().splitlines()) == 1 and ("in use by fmjax train" in err or "already holds" in err), err
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert steps == sorted(set(steps)) and len(steps) == 4  # one run's log, not two interleaved
    assert _temporaries(out) == []


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("setting", ["train.keep_checkpoints=0", "train.checkpoint_every=0", "train.log_every=0",
                                     "train.steps=0", "net.base_channels=0", "train.ema_decay=1.5",
                                     "calibration.image_threshold_quantile=1.01",
                                     "calibration.pixel_threshold_quantile=nan",
                                     "calibration.holdout_fraction=-0.1", "train.learning_rate=inf",
                                     "score.num_paths=0", "data.image_size=0"])
def test_settings_that_cannot_work_are_refused_before_any_work(setting, data_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", out,
                       *TRAIN_ARGS, "--set", setting)
    assert_one_line_error(code, err)
    assert setting.split("=")[0] in err
    assert not out.exists()


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def tiny_disk(tmp_path):
    """mount(size in MB) -> a fresh tmpfs of that size (skipped where this process may not
    mount one), unmounted after the test."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("a tmpfs needs Linux and mount")
    points = []

    def mount(size_mb=2):
        point = tmp_path / f"disk{len(points)}"
        point.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'})")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(disk, leave: int):
    """Fills `disk` but `leave` bytes."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("when", ["before the save", "while orbax writes"])
def test_a_full_disk_under_train_out(when, data_root, tiny_disk, monkeypatch, capsys):
    if when == "while orbax writes":  # past the free-space check: orbax's own failure
        from fmjax.training import checkpoints

        monkeypatch.setattr(checkpoints, "_check_space", lambda *args: None)
    disk = tiny_disk(1)
    out = disk / "run"  # the tiny preset's checkpoint (1.7 MB) does not fit
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", out,
                       *TRAIN_ARGS)
    assert_one_line_error(code, err)
    assert "No space left on device" in err and str(disk) in err, err
    assert _temporaries(disk) == []


def test_a_failed_save_waits_for_its_threads_before_cleaning_up(tmp_path):
    """A save that fails while another of its threads still writes into the unfinished
    checkpoint leaves nothing behind: that thread ends before the folder is removed."""
    import threading

    from fmjax.training import checkpoints

    writers = []

    class Manager:
        directory = tmp_path

        def save(self, step, args):
            def late_writer():
                time.sleep(0.3)
                os.makedirs(tmp_path / f"{step}.orbax-checkpoint-tmp" / "default", exist_ok=True)

            writers.append(threading.Thread(target=late_writer, name="serialize_shardings"))
            writers[-1].start()
            raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    state = _tiny_state()
    with pytest.raises(OSError, match="No space left on device"):
        checkpoints.save_state(Manager(), 7, state)
    writers[0].join()
    assert _temporaries(tmp_path) == []


def test_a_failed_save_says_nothing_from_orbax_threads_and_restores_their_loggers(tmp_path, caplog):
    """Orbax's threads may report a failed write before the save raises it: nothing of it
    reaches the log, and after a good save the loggers are as they were."""
    import logging

    from fmjax.training import checkpoints

    class Manager:
        directory = tmp_path
        fail = True

        def save(self, step, args):
            logging.getLogger("absl").error("tensorstore: No space left on device (from a writer thread)")
            logging.getLogger("asyncio").error("Task exception was never retrieved")
            if self.fail:
                raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    state = _tiny_state()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    before = [logger.level for logger in loggers]
    try:
        manager = Manager()
        manager.fail = False
        with caplog.at_level(logging.WARNING):
            checkpoints.save_state(manager, 6, state)
        assert [logger.level for logger in loggers] == before
        caplog.clear()
        manager.fail = True
        with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="No space left on device"):
            checkpoints.save_state(manager, 7, state)
        assert caplog.records == []
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


def test_a_failed_save_names_its_checkpoint_when_its_threads_raise_on_join(tmp_path):
    """orbax's threads raise their own failure again when joined (an OSError naming no
    file, here): the save still raises one OSError naming the checkpoint, and cleans up."""
    import threading

    from fmjax.training import checkpoints

    class RaisingThread(threading.Thread):
        def join(self, timeout=None):
            super().join(timeout)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Manager:
        directory = tmp_path

        def save(self, step, args):
            os.makedirs(tmp_path / f"{step}.orbax-checkpoint-tmp")
            RaisingThread(target=time.sleep, args=(0.1,), name="write_metadata").start()
            raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    state = _tiny_state()
    with pytest.raises(OSError, match="No space left on device") as raised:
        checkpoints.save_state(Manager(), 7, state)
    assert raised.value.filename == os.path.join(str(tmp_path), "7")
    assert _temporaries(tmp_path) == []


def test_a_failed_save_drops_the_unraisable_errors_of_its_threads_and_a_good_one_keeps_them(tmp_path,
                                                                                              monkeypatch):
    """A failed save's pending TensorStore writes each raise an unraisable "Event loop is
    closed" once the save's event loop has closed (printed on stderr, outside pytest): none
    reaches the user beside the one-line error. A good save's are passed on."""
    import threading

    from fmjax.training import checkpoints

    class PendingWrite:
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    class Manager:
        directory = tmp_path
        fail = False

        def save(self, step, args):
            writer = threading.Thread(target=PendingWrite)
            writer.start()
            writer.join()
            if self.fail:
                raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    state = _tiny_state()
    manager = Manager()
    checkpoints.save_state(manager, 6, state)
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed"]
    manager.fail = True
    with pytest.raises(OSError, match="No space left on device"):
        checkpoints.save_state(manager, 7, state)
    assert len(seen) == 1 and sys.unraisablehook == seen.append


def test_a_full_disk_under_maps_out(run_copy, tiny_disk, capsys):
    disk = tiny_disk(2)
    _fill(disk, 8 << 10)
    maps = disk / "maps"
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps, "--pictures-out",
                       disk / "pictures")
    assert_one_line_error(code, err)
    assert "No space left on device" in err and str(disk) in err, err
    assert sorted(os.listdir(disk)) == ["filler"]
    assert not (run_copy / "metrics.json").exists() and _temporaries(run_copy) == []


def test_a_full_disk_under_the_run_folder(run_copy, tiny_disk, capsys):
    disk = tiny_disk(8)
    run = disk / "run"
    shutil.copytree(run_copy, run)
    _fill(disk, 0)
    code, _, err = cli(capsys, "evaluate", "--run", run)
    assert_one_line_error(code, err)
    assert "No space left on device" in err and str(run) in err, err
    assert not (run / "metrics.json").exists() and _temporaries(run) == []
    assert sorted(os.listdir(run)) == sorted(os.listdir(run_copy))


# ----------------------------------------------------------------------------- killed during evaluate

def test_evaluate_killed_leaves_no_metrics_and_its_staging_is_removed_next_time(run_copy, tmp_path, capsys):
    out = tmp_path / "outputs"
    out.mkdir()
    maps = out / "maps"
    child = _child(f"from fmjax.app.cli import main; main(['evaluate', '--run', {str(run_copy)!r}, "
                   f"'--maps-out', {str(maps)!r}])", env=subprocess_env(1, FMJAX_ALLOCATOR="system"))
    try:
        deadline = time.time() + 300
        while not any(n.startswith(".fmjax-stage-") for n in os.listdir(out)):
            assert child.poll() is None and time.time() < deadline, child.stderr.read()
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not maps.exists() and not (run_copy / "metrics.json").exists()
    assert len(_temporaries(out)) == 1
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["maps"] and _temporaries(run_copy) == []
    assert (run_copy / "metrics.json").exists()


# ----------------------------------------------------------------------------- killed while training and saving

def test_train_killed_while_saving_resumes_to_the_uninterrupted_run(data_root, tmp_path, capsys):
    args = [*TRAIN_ARGS, "--set", "train.steps=6", "--set", "train.checkpoint_every=1"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", reference,
               *args)[0] == 0
    child = _child(f"from fmjax.app.cli import main; main(['train', '--data', {f'folder:{data_root}'!r}, "
                   f"'--category', {CATEGORY!r}, '--out', {str(killed)!r}, *{args!r}])",
                   env=subprocess_env(1, FMJAX_ALLOCATOR="system"))
    try:
        deadline = time.time() + 300
        checkpoints = killed / "checkpoints"
        # kill at the first unfinished save that shows (or, at the latest, once a save is done)
        while not (checkpoints.is_dir() and any("tmp" in n or n.isdigit() for n in os.listdir(checkpoints))):
            assert child.poll() is None and time.time() < deadline, child.stderr.read()
            time.sleep(0.002)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (killed / "calibration.json").exists()
    code, _, err = cli(capsys, "train", "--data", f"folder:{data_root}", "--category", CATEGORY, "--out", killed,
                       "--resume", *args)
    assert code == 0, err
    assert _temporaries(killed) == []
    from fmjax import runs
    import jax
    import numpy as np
    want, got = runs.load_run(str(reference)), runs.load_run(str(killed))
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.load(open(killed / "calibration.json")) == json.load(open(reference / "calibration.json"))


# ----------------------------------------------------------------------------- --maps-out

def test_maps_out_replaces_an_earlier_output_and_refuses_a_foreign_folder(run_copy, tmp_path, capsys):
    maps = tmp_path / "maps"
    assert cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps)[0] == 0
    (maps / CATEGORY / "test" / "good" / "stale.tiff").write_bytes(b"from an earlier evaluation")
    assert cli(capsys, "evaluate", "--run", run_copy, "--maps-out", maps)[0] == 0
    tiffs = sorted(p.relative_to(maps / CATEGORY).with_suffix("").as_posix()
                   for p in (maps / CATEGORY).rglob("*.tiff"))
    assert tiffs == sorted(image_scores_csv(maps / CATEGORY / "image_scores.csv"))  # the table lists every map
    assert "test/good/stale" not in tiffs and _temporaries(tmp_path) == []

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"mine")
    (run_copy / "metrics.json").unlink()
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", photos)
    assert_one_line_error(code, err)
    assert "did not write" in err
    assert os.listdir(photos) == ["holiday.png"] and not (run_copy / "metrics.json").exists()


# ----------------------------------------------------------------------------- damaged run folders

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _largest_checkpoint_file(run):
    return max((p for p in (run / "checkpoints").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _edit_image_size(run):
    config = json.loads((run / "config.json").read_text())
    config["data"]["image_size"] *= 2
    (run / "config.json").write_text(json.dumps(config))


DAMAGE = {  # case -> (what to do to the run folder, what the error line must name)
    "truncated config": (lambda run: _truncate(run / "config.json"), "config.json"),
    "truncated config, no manifest": (lambda run: (_truncate(run / "config.json"), (run / "manifest.json").unlink()),
                                      "config.json is damaged"),
    "edited image_size": (_edit_image_size, "config.json is not the one training wrote"),
    "truncated checkpoint": (lambda run: _truncate(_largest_checkpoint_file(run)), "checkpoint file of the run is"),
    "truncated checkpoint, no manifest": (lambda run: (_truncate(_largest_checkpoint_file(run)),
                                                       (run / "manifest.json").unlink()), "checkpoint"),
    "missing checkpoint file": (lambda run: _largest_checkpoint_file(run).unlink(), "is missing"),
    "truncated manifest": (lambda run: _truncate(run / "manifest.json"), "manifest.json is damaged"),
    "truncated calibration": (lambda run: _truncate(run / "calibration.json"), "calibration.json"),
    "no checkpoints": (lambda run: shutil.rmtree(run / "checkpoints"), "no checkpoint"),
    "a file added": (lambda run: (run / "calibration.npz").write_bytes(b"PK"), "is not listed"),
}


# orbax's readers of a damaged checkpoint are collected after the error, complaining:
# collected here, in the test that damaged it, not in whichever test runs next
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_folder_is_one_line_naming_the_file(case, run_copy, data_root, tmp_path, capsys):
    damage, named = DAMAGE[case]
    damage(run_copy)
    before = sorted(os.listdir(run_copy))
    code, _, err = cli(capsys, "evaluate", "--run", run_copy, "--maps-out", tmp_path / "maps")
    assert_one_line_error(code, err)
    assert named in err, err
    out = tmp_path / "predictions"
    code, _, err = cli(capsys, "predict", "--run", run_copy, "--input", data_root / CATEGORY / "test" / "good",
                       "--out", out)
    assert_one_line_error(code, err)
    assert named in err, err
    assert sorted(os.listdir(run_copy)) == before and not out.exists() and not (tmp_path / "maps").exists()
    gc.collect()


# ----------------------------------------------------------------------------- the environment

def _cli_process(args, timeout=120, **env):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fmjax.app.cli", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=subprocess_env(1, FMJAX_ALLOCATOR="system", **env))
    return result, time.perf_counter() - start


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


def test_a_cluster_environment_neither_hangs_nor_traces_back(tmp_path):
    result, _ = _cli_process(["info"], **SLURM)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    result, _ = _cli_process(["info"], COORDINATOR_ADDRESS="10.0.0.2:99")  # another program's variable
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    result, _ = _cli_process(["evaluate", "--run", str(tmp_path / "no_run")], JAX_COORDINATOR_ADDRESS="10.0.0.2:99")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set" in result.stderr
    result, _ = _cli_process(["evaluate", "--run", str(tmp_path / "no_run")], **SLURM)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "runs alone: pass --distributed" in lines[0] and "does not exist" in lines[1], lines


def test_a_multi_host_start_up_that_cannot_complete_ends_in_its_time_limit(tmp_path):
    with socket.socket() as s:  # a port where no coordinator answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, seconds = _cli_process(["evaluate", "--run", str(tmp_path / "no_run")], timeout=90,
                                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                   JAX_PROCESS_ID="1", FMJAX_DISTRIBUTED_TIMEOUT="3")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fmjax")]
    assert len(lines) == 1 and "not every process connected within 3 s" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and seconds < 60
