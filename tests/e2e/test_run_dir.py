"""A RUN_DIR across launches, through `make train`: a finished run is left alone, a refused resume
writes nothing, the manifest lists every launch that trained, the summary covers the whole run,
one job at a time holds the directory, and workers end with their launcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from env.records.runlock import LOCK_NAME, RunDirBusy, RunDirLock
from tests.conftest import ROOT
from train.rundir import completed_steps, earlier_records

pytestmark = pytest.mark.slow
F = "model.max_seq_len=32 data.seq_len=32"


def make_train(run_dir: Path, steps: int, args: str = "", gpus: int = 1) -> list[str]:
    return ["make", "-s", "train", "RUNTIME=local", "CONFIG=tiny", f"GPUS={gpus}", "MICRO_BATCH=2",
            f"STEPS={steps}", f"RUN_DIR={run_dir}", f"ARGS={F} {args}".strip()]  # fmt: skip


def run_make(run_dir: Path, steps: int, args: str = "", gpus: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(make_train(run_dir, steps, args, gpus), cwd=ROOT, capture_output=True, text=True, timeout=300)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def records(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run but the lock (whose holder line each launch rewrites): size and mtime."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> dict:
    """One RUN_DIR through four launches: 4 steps, the same again, a refused resume, then on to 6."""
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    seen: dict = {"run_dir": run_dir}
    seen["first"] = run_make(run_dir, 4)
    seen["summary_1"] = (run_dir / "summary.json").read_bytes()
    seen["rows_1"] = rows(run_dir)
    seen["files_1"] = records(run_dir)
    seen["again"] = run_make(run_dir, 4)
    seen["files_2"] = records(run_dir)
    seen["summary_2"] = (run_dir / "summary.json").read_bytes()
    manifest = (run_dir / "manifest.json").read_bytes()
    seen["refused"] = run_make(run_dir, 6, "model.dim=64")
    seen["manifest_kept"] = manifest == (run_dir / "manifest.json").read_bytes()
    seen["resumed"] = run_make(run_dir, 6)
    return seen


def test_a_finished_run_rerun_says_so_and_changes_nothing(history) -> None:
    assert history["first"].returncode == 0, history["first"].stderr
    again = history["again"]
    assert again.returncode == 0, again.stderr
    assert "already complete (4 steps" in again.stdout
    assert "training" not in again.stdout  # no worker was started
    assert history["summary_2"] == history["summary_1"] and history["files_2"] == history["files_1"]
    assert json.loads(history["summary_1"])["steps"] == 4


def test_a_refused_resume_leaves_the_manifest_alone(history) -> None:
    refused = history["refused"]
    assert refused.returncode == 2 and "model.dim=128" in refused.stderr
    assert history["manifest_kept"]


def test_the_manifest_lists_each_launch_that_trained_and_describes_the_first(history) -> None:
    assert history["resumed"].returncode == 0, history["resumed"].stderr
    manifest = json.loads((history["run_dir"] / "manifest.json").read_text())
    assert manifest["config"]["model"]["dim"] == 128 and manifest["config"]["train"]["steps"] == 4
    launches = manifest["launches"]
    assert [launch["config"]["train"]["steps"] for launch in launches] == [4, 6]  # the refused one is absent
    for launch in launches:
        assert launch["hostname"] == socket.gethostname() and len(launch["git"]["commit"]) == 40
        assert launch["command"][0].endswith("launch.py") and launch["created_utc"]


def test_after_a_resume_the_summary_covers_the_whole_run(history) -> None:
    summary = json.loads((history["run_dir"] / "summary.json").read_text())
    first_rows = history["rows_1"]
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 4
    assert summary["first_loss"] == first_rows[0]["loss"]
    assert summary["final_loss"] == rows(history["run_dir"])[-1]["loss"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            if int(ppid) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process parents from /proc")
def test_a_second_job_is_refused_and_a_killed_launcher_takes_its_workers_along(tmp_path) -> None:
    run_dir = tmp_path / "r"
    # A long 2-worker run, slowed down so that it is surely still running when we act; no periodic checkpoint.
    job = subprocess.Popen(
        make_train(run_dir, 1000, "train.ckpt_every=1000", gpus=2),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TORCHRIG_TEST_STEP_SLEEP": "0.2"},
    )
    workers: list[int] = []
    try:
        assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and rows(run_dir), 240), "the run never logged"
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        launcher = holder["pid"]
        workers = [pid for pid in _children(launcher) if "train.worker" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2

        second = run_make(run_dir, 1000)
        assert second.returncode == 2
        refusals = [line for line in second.stderr.splitlines() if "in use by a running job" in line]
        assert refusals == [line for line in refusals if f"(pid {launcher} on host {socket.gethostname()}," in line]
        assert len(refusals) == 1 and "Traceback" not in second.stderr

        os.kill(launcher, signal.SIGKILL)
        job.wait(timeout=60)
        # Generous: the assertion is that they end, not how fast.
        assert _wait_for(lambda: not any(_alive(pid) for pid in workers), 120), "workers outlived their launcher"
        checkpoints = run_dir / "checkpoints"
        written = [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] if checkpoints.exists() else []
        assert written == [], "a checkpoint was written after the launcher died"

        # The dead job's lock file is still there, and does not block a rerun.
        assert (run_dir / LOCK_NAME).exists()
        rerun = run_make(run_dir, 2)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
            job.wait()


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


def test_completion_and_history_read_hostile_files_safely(tmp_path) -> None:
    (tmp_path / "summary.json").write_bytes(b"\xff\xfe not json")
    assert completed_steps(tmp_path, 4) is None
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "stopped_early": True}))
    assert completed_steps(tmp_path, 4) is None  # stopped by SIGTERM: a rerun continues it
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "stopped_early": False}))
    assert completed_steps(tmp_path, 4) == 4 and completed_steps(tmp_path, 5) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n[1]\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert [r["step"] for r in earlier_records(tmp_path, 2)] == [1, 2]
    # Links to endless devices read as absent, and do not hang the reader.
    for name in ("summary.json", "metrics.jsonl"):
        (tmp_path / name).unlink()
        (tmp_path / name).symlink_to("/dev/zero")
    assert completed_steps(tmp_path, 4) is None and earlier_records(tmp_path, 2) == []
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").write_bytes(b"x" * 200_000 + b'\n{"step": 1, "loss": 3.0}\n')  # one row too long
    assert [r["step"] for r in earlier_records(tmp_path, 2)] == [1]


def _ends_with_killed_parent(parent_code: str) -> bool:
    """Run parent_code (which starts a child and prints its pid), SIGKILL it, and say whether the child ended."""
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(ROOT)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait()
        return _wait_for(lambda: not _alive(child), 60)  # generous: that it ends, not how fast
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


def test_a_worker_ends_when_its_parent_is_killed() -> None:
    # parent -> child in a session of its own, as torchrun starts workers; the child asks to end with
    # its parent, says so, and sleeps.
    child_code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from env.rig.lifeline import end_with_parent;"
        "end_with_parent(); print('ready', flush=True); time.sleep(600)"
    )
    parent_code = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],"
        " start_new_session=True); print(p.pid, flush=True); time.sleep(600)"
    )
    assert _ends_with_killed_parent(parent_code.replace("sys.argv[1], sys.argv[2]", f"{child_code!r}, sys.argv[1]"))


def test_end_with_parent_ends_at_once_when_the_parent_is_already_gone() -> None:
    # The launcher died before the worker asked for the signal: its parent is no longer the expected one.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from env.rig.lifeline import end_with_parent; end_with_parent(1)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_the_docker_client_gets_sigterm_when_the_dispatcher_is_killed() -> None:
    # As env/rig/docker.py starts `docker compose run`: here a stand-in client (sleep) under a stand-in dispatcher.
    parent_code = (
        "import subprocess, sys, time; sys.path.insert(0, sys.argv[1]);"
        "from env.rig.lifeline import signal_when_parent_dies;"
        "p = subprocess.Popen(['sleep', '600'], preexec_fn=signal_when_parent_dies()); print(p.pid, flush=True);"
        "print('ready', flush=True); time.sleep(600)"
    )
    assert _ends_with_killed_parent(parent_code), "the client outlived the dispatcher"
