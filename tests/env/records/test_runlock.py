"""The run lock (env/records/runlock.py): one job at a time holds a RUN_DIR; a dead holder's lock does not block,
and a link at the lock's name is not followed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from env.records.runlock import LOCK_NAME, RunDirBusy, RunDirLock

# Slow, as when they were part of the RUN_DIR tests through make (tests/e2e/test_run_dir.py).
pytestmark = pytest.mark.slow


def test_a_lock_held_in_this_process_is_refused_and_released_on_close(tmp_path) -> None:
    with RunDirLock(tmp_path), pytest.raises(RunDirBusy, match=rf"pid {os.getpid()} on host"):
        RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # released: a new holder gets it


def test_a_stale_flock_of_a_dead_pid_on_this_host_does_not_block(tmp_path) -> None:
    # A lock the file system kept for a holder that is gone (as some network file systems do).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = RunDirLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x"}))
    try:
        with RunDirLock(tmp_path) as fresh:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(RunDirBusy):
                RunDirLock(tmp_path).acquire()
            assert fresh
    finally:
        stale.release()


def test_a_lock_name_that_is_a_link_is_not_followed(tmp_path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).symlink_to(target)
    with pytest.raises(OSError):
        RunDirLock(run_dir).acquire()
    assert target.read_text() == "keep"
