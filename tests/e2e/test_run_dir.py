"""A RUN_DIR across launches, through `make train`: a finished run is left alone, a refused resume
writes nothing, the manifest lists every launch that trained, the summary covers the whole run,
one job at a time holds the directory, and workers end with their launcher.

The run lock, the lifeline and reading a RUN_DIR's records on their own: tests/env/records/test_runlock.py,
tests/env/rig/test_lifeline.py, tests/train/test_rundir.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from env.records.runlock import LOCK_NAME
from tests.helpers.make import pinned_venv
from tests.helpers.paths import ROOT
from tests.helpers.processes import alive, children, wait_for
from tests.helpers.trainrun import metrics

pytestmark = [pytest.mark.slow, pinned_venv]
F = "model.max_seq_len=32 data.seq_len=32"


def make_train(run_dir: Path, steps: int, args: str = "", gpus: int = 1) -> list[str]:
    return ["make", "-s", "train", "RUNTIME=local", "CONFIG=tiny", f"GPUS={gpus}", "MICRO_BATCH=2",
            f"STEPS={steps}", f"RUN_DIR={run_dir}", f"ARGS={F} {args}".strip()]  # fmt: skip


def run_make(run_dir: Path, steps: int, args: str = "", gpus: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(make_train(run_dir, steps, args, gpus), cwd=ROOT, capture_output=True, text=True, timeout=300)


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
    seen["rows_1"] = metrics(run_dir)
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
    assert summary["final_loss"] == metrics(history["run_dir"])[-1]["loss"]


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
        assert wait_for(lambda: (run_dir / "metrics.jsonl").exists() and metrics(run_dir), 240), "the run never logged"
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        launcher = holder["pid"]
        workers = [pid for pid in children(launcher) if "train.worker" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2

        second = run_make(run_dir, 1000)
        assert second.returncode == 2
        refusals = [line for line in second.stderr.splitlines() if "in use by a running job" in line]
        assert refusals == [line for line in refusals if f"(pid {launcher} on host {socket.gethostname()}," in line]
        assert len(refusals) == 1 and "Traceback" not in second.stderr

        os.kill(launcher, signal.SIGKILL)
        job.wait(timeout=60)
        # Generous: the assertion is that they end, not how fast.
        assert wait_for(lambda: not any(alive(pid) for pid in workers), 120), "workers outlived their launcher"
        checkpoints = run_dir / "checkpoints"
        written = [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] if checkpoints.exists() else []
        assert written == [], "a checkpoint was written after the launcher died"

        # The dead job's lock file is still there, and does not block a rerun.
        assert (run_dir / LOCK_NAME).exists()
        rerun = run_make(run_dir, 2)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
            job.wait()
