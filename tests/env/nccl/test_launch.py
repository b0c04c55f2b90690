"""nccl-test's launcher (env/nccl/launch.py) and its gloo runs end to end: 2 CPU processes, tiny sizes.

The collectives table, the options and the verdict are tested on their own in test_collectives.py,
test_options.py and tests/env/machine/test_links.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import env.nccl.launch as nccl_test
from env.common.cli import exit_code
from env.nccl.collectives import COLLECTIVES, CORRUPT_ENV
from env.nccl.worker import STALL_ENV
from tests.helpers.paths import ROOT

KiB = 1 << 10


def test_main_rejects_bad_input_before_launching(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(nccl_test, "launch_workers", lambda *a: pytest.fail("launched despite bad input"))
    assert exit_code("nccl-test", nccl_test.main, ["--ops", "all_reduce", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchrig nccl-test: --dtype int8") and "\n" not in err


def test_main_hands_valid_input_to_the_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    seen = {}

    def fake_launch(options, argv, cuda_gpus):
        seen.update(options=options, argv=argv)
        return 0

    monkeypatch.setattr(nccl_test, "launch_workers", fake_launch)
    argv = ["--gpus", "2", "--ops", "all", "--sizes", "8:1K:2"]
    assert nccl_test.main(argv) == 0
    assert seen["argv"] == argv and seen["options"].gpus == 2 and seen["options"].sizes[-1] == KiB


# ---- gloo runs: 2 CPU processes, tiny sizes --------------------------------------------------------------------

GLOO_ARGS = ["--sizes", "8:4K:8", "--iters", "2", "--warmup", "1", "--first-timeout", "20"]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHRIG_", "NCCL_"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def torchrun(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "env.nccl.launch", *args]
    return subprocess.run(command, cwd=ROOT, env=worker_env(**extra), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_gloo_run_of_every_op_prints_the_table_and_writes_json(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    done = torchrun(["--ops", "all", "--json", str(record_path), *GLOO_ARGS])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "time   algbw   busbw  #wrong" in out
    assert out.count("# Out of bounds values : 0 OK") == len(COLLECTIVES)
    assert out.count("# Avg bus bandwidth") == len(COLLECTIVES)
    assert "VERDICT: PASS" in out and "bandwidth not judged: no GPU" in out
    record = json.loads(record_path.read_text())
    assert record["world_size"] == 2 and record["verdict"]["status"] == "PASS"
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["nccl_pinned"]
    assert record["p2p"]["source"] in ("no-gpu", "user")
    assert {row["op"] for row in record["rows"]} == set(COLLECTIVES)
    keys = {"op", "bytes", "count", "time_us", "algbw", "busbw", "wrong", "lat_median_us", "lat_p99_us"}
    for row in record["rows"]:
        assert keys <= set(row) and row["wrong"] == 0 and row["time_us"] > 0
        assert row["busbw"] == pytest.approx(row["algbw"] * COLLECTIVES[row["op"]].busbw_factor(2))


@pytest.mark.slow
def test_corrupted_results_are_counted_and_fail(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    done = torchrun(["--ops", "all_reduce,all_gather", "--json", str(record_path), *GLOO_ARGS], **{CORRUPT_ENV: "2"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "VERDICT: FAIL" in done.stdout
    record = json.loads(record_path.read_text())
    assert record["verdict"]["status"] == "FAIL"
    assert all(row["wrong"] == 2 for row in record["rows"])


@pytest.mark.slow
def test_a_hung_first_collective_ends_in_one_fail_line():
    began = time.monotonic()
    done = torchrun(["--first-timeout", "3", "--sizes", "8"], **{STALL_ENV: "1"})
    assert done.returncode != 0
    assert time.monotonic() - began < 60
    lines = [line for line in done.stdout.splitlines() if "did not finish" in line]
    assert len(lines) == 1 and "NCCL_P2P_DISABLE=1" in lines[0] and "/dev/shm" in lines[0]


@pytest.mark.slow
def test_the_cli_launches_its_own_workers_and_exits_with_the_verdict(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "env.nccl.launch", "--gpus", "2", "--json", str(record_path),
               "--run-dir", str(run_dir), *GLOO_ARGS]  # fmt: skip
    done = subprocess.run(
        [*command, "--min-busbw", "100000"], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nccl-test: P2P" in done.stdout and "below --min-busbw" in done.stdout
    assert json.loads(record_path.read_text())["world_size"] == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "nccl-test" and manifest["p2p"]["source"] == "no-gpu"


def test_a_second_nccl_test_into_a_held_run_dir_is_refused_at_once(tmp_path: Path):
    from env.records.runlock import RunDirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunDirLock(run_dir):  # the first job, running
        command = [sys.executable, "-m", "env.nccl.launch", "--gpus", "2", "--run-dir", str(run_dir), *GLOO_ARGS]
        done = subprocess.run(command, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("in use by a running job") == 1 and f"(pid {os.getpid()} on host" in done.stderr
    assert not (run_dir / "manifest.json").exists()
