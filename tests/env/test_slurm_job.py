"""env/slurm/job.py without a cluster: what it submits and runs, from the make variables and Slurm's.

The cluster itself (sbatch, srun, preemption, a killed node) is tested by make test-slurm (tests/e2e/slurm/).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from env.common.cli import UserError
from env.slurm import job
from tests.helpers.paths import ROOT

HOSTILE = "$(touch /tmp/torchrig-pwned); `id` 'x\" ; rm -rf ~"


def test_submit_passes_nodes_and_gpus_to_sbatch_and_every_value_literally() -> None:
    command = job.sbatch_command("train", {"NNODES": "2", "GPUS": "4", "CONFIG": "tiny", "ARGS": HOSTILE})
    assert command[:3] == ["sbatch", "--nodes=2", "--gpus-per-node=4"]
    assert command[3].endswith("env/slurm/train.sbatch")
    assert command[4:] == ["CONFIG=tiny", f"ARGS={HOSTILE}"]  # one argument each, never seen by a shell


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"NODE_RANK": "1"}, "NODE_RANK is set by Slurm"),
        ({"MASTER_ADDR": "10.0.0.1"}, "MASTER_ADDR is set by Slurm"),
        ({"STEPZ": "3"}, "unknown variable STEPZ"),
        ({"RUNTIME": "podman"}, "RUNTIME=podman is not one of local, docker, pyxis"),
        ({"GPUS": "two"}, "GPUS 'two' is not a whole number"),
    ],
)
def test_bad_variables_are_one_line_before_anything_is_submitted(values: dict, message: str) -> None:
    with pytest.raises((UserError, ValueError), match=message):
        job.sbatch_command("train", {"NNODES": "2", **values})


def test_nccl_test_takes_its_own_variables_not_trainings() -> None:
    assert "SIZES" in job.allowed_variables("nccl-test") and "STEPS" not in job.allowed_variables("nccl-test")
    with pytest.raises(UserError, match="unknown variable STEPS"):
        job.check_variables("nccl-test", {"STEPS": "3"})


def test_batch_refuses_to_run_outside_a_job(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UserError, match="submit this with sbatch"):
        job.batch("train", {"CONFIG": "tiny"})


def test_a_node_takes_its_place_and_gpus_from_slurm(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    values = job.node_values({"CONFIG": "tiny"}, "10.0.0.1", "29411")
    slurm = {"GPUS": "8", "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29411"}
    assert values == {"CONFIG": "tiny", **slurm}
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert job.node_values({}, "a", "1")["GPUS"] == "2"


def test_the_rendezvous_is_c10d_under_the_job_id_and_restart(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.rendezvous_env("77") == {"PET_RDZV_BACKEND": "c10d", "TORCHELASTIC_RUN_ID": "slurm-77-2"}
    assert job.default_run_dir("train", "77") == "runs/slurm-train-77"  # the same after a requeue


def test_the_container_is_named_after_the_job_on_the_host_network(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    name = job.container_name("77")
    env = {"SLURM_JOB_ID": "77", "NCCL_SOCKET_IFNAME": "ib0", "PET_RDZV_BACKEND": "c10d", "HOME": "/root"}
    command = job.docker_command(["python", "-m", "train.launch"], {"RUN_DIR": str(tmp_path)}, env, name, gpu=False)
    assert name == "torchrig-77-0-node1" and command[command.index("--name") + 1] == name
    assert "slurm_job=77" in command and "--network" in command and command[command.index("--network") + 1] == "host"
    assert command[command.index("--pid") + 1] == "host"  # launchers' pids differ, as c10d's node ids need
    assert f"{tmp_path}:{tmp_path}" in command  # an absolute RUN_DIR on shared storage, at the same path
    assert "NCCL_SOCKET_IFNAME=ib0" in command and "PET_RDZV_BACKEND=c10d" in command
    assert "HOME=/root" not in command and "--gpus" not in command
    assert command[-3:] == ["python", "-m", "train.launch"]


UNCONFIGURED = """#!/bin/sh
echo "sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host" >&2
echo "sbatch: error: fetch_config: DNS SRV lookup failed" >&2
echo "sbatch: error: _establish_configuration: failed to load configs" >&2
echo "sbatch: fatal: Could not establish a configuration source" >&2
exit 1
"""
ACCEPTING = '#!/bin/sh\necho "Submitted batch job 42"\n'


@pytest.mark.parametrize("sbatch", [UNCONFIGURED, ACCEPTING], ids=["unconfigured", "accepting"])
def test_sbatch_answers_on_stdout_or_its_refusal_is_one_line(tmp_path: Path, sbatch: str) -> None:
    fake = tmp_path / "sbatch"
    fake.write_text(sbatch)
    fake.chmod(0o755)
    environ = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "env.slurm.job", "submit", "train", "NNODES=1", "CONFIG=tiny"]
    result = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    if sbatch is ACCEPTING:
        assert result.returncode == 0 and result.stdout == "Submitted batch job 42\n", result.stderr
        assert len(lines) == 1 and lines[0].startswith("torchrig: sbatch --nodes=1 "), lines
        return
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 2 and lines[0].startswith("torchrig: sbatch "), lines  # the command, then why it failed
    assert lines[1].startswith("torchrig slurm: sbatch refused the job: sbatch: fatal: Could not establish"), lines
    assert "slurm.conf" in lines[1] and "sinfo" in lines[1]
