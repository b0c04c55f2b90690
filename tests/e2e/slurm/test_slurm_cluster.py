"""env/slurm/ on a real Slurm cluster: two slurmd nodes on this machine, started by env/ci/slurm_check.sh.

Skipped unless TORCHRIG_SLURM_CLUSTER names that cluster's directory (`make test-slurm` sets it), so the
plain test suite skips them. Every job runs 1 CPU process per node on gloo, fp32, through sbatch.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.trainrun import SMALL, assert_states_equal, checkpoint_state, launch_train, losses, metrics

CLUSTER = os.environ.get("TORCHRIG_SLURM_CLUSTER", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CLUSTER, reason="needs the Slurm cluster that make test-slurm starts (env/ci/slurm_check.sh)"
    ),
]
STEPS = 8
CKPT = ["train.ckpt_every=2", f"train.lr_decay_steps={STEPS}"]
# One thread per process in every run, so that the Slurm runs and the reference do the same arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
IMAGE = "torchrig:test-bookworm"  # what make test-image builds


class Job:
    def __init__(self, job_id: str, log: Path) -> None:
        self.id = job_id
        self.log = log

    def field(self, name: str) -> str:
        shown = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, check=True)
        found = re.search(rf"\b{name}=(\S+)", shown.stdout)
        return found[1] if found else ""

    def wait(self, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED"), timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.field("JobState")
            if state in states:
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {self.id} still {self.field('JobState')} after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        """The job's output file, then what Slurm says of the job (its state, reason and exit code)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no output)"
        shown = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, check=False)
        said = [f"--- scontrol show job {self.id}:", shown.stdout + shown.stderr]
        for log in sorted(Path(CLUSTER, "log").glob("*.log")) if CLUSTER else []:  # what the daemons said of it
            mine = re.compile(rf"(JobId={self.id}\b|job {self.id}\b|\[{self.id}\.|StepId={self.id}\.)")
            said += [
                f"--- {log.name}:",
                *(line for line in log.read_text(errors="replace").splitlines() if mine.search(line)),
            ]
        return "\n".join([text, *said])


def submit(tmp_path: Path, script: str, *variables: str, nodes: int = 2, env: dict | None = None) -> Job:
    log = tmp_path / f"{script}-%j.out"
    command = [
        "sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=1", f"--output={log}",
        str(ROOT / "env" / "slurm" / f"{script}.sbatch"), *variables,
    ]  # fmt: skip
    submitted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env or ENV, check=False)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    return Job(job_id, Path(str(log).replace("%j", job_id)))


def train_variables(run_dir: Path | None, steps: int, *overrides: str) -> list[str]:
    given = [f"RUN_DIR={run_dir}"] if run_dir else []
    return [*given, "CONFIG=tiny", f"STEPS={steps}", f"ARGS={' '.join([*SMALL, *overrides])}"]


def processes_of(marker: str) -> list[str]:
    """Command lines of live processes that mention marker (a run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "pytest" not in cmdline:
                found.append(cmdline)
    return found


def worker_on_node(marker: str, node_id: int) -> tuple[int, int]:
    """(pid, RANK) of the train.worker that node node_id's task started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = dict(
                item.decode(errors="replace").partition("=")[::2]
                for item in (entry / "environ").read_bytes().split(b"\0")
                if item
            )
        except OSError:
            continue
        if b"train.worker" in cmdline and marker.encode() in cmdline and environ.get("SLURM_NODEID") == str(node_id):
            return int(entry.name), int(environ["RANK"])
    raise AssertionError(f"no worker on node {node_id}")


def wait_for_step(run_dir: Path, step: int, job: Job, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and metrics(run_dir) and metrics(run_dir)[-1]["step"] >= step:
            return
        assert job.field("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job.output()
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached:\n{job.output()}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """make train GPUS=2: the same seed and global batch on one node."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = launch_train(run_dir, 2, STEPS, *CKPT, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return run_dir


def test_two_nodes_of_one_process_train_bitwise_like_one_node_of_two(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = submit(tmp_path, "train", *train_variables(run_dir, STEPS, *CKPT))
    assert job.wait() == "COMPLETED", job.output()
    assert losses(run_dir) == losses(reference)
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def test_nccl_test_across_the_two_nodes_has_no_wrong_element(tmp_path) -> None:
    run_dir = tmp_path / "nccl"
    job = submit(tmp_path, "nccl-test", f"RUN_DIR={run_dir}", "SIZES=8:256K:8")
    assert job.wait() == "COMPLETED", job.output()
    record = json.loads((run_dir / "nccl_test.json").read_text())
    assert record["world_size"] == 2 and record["nodes"] == 2
    assert record["ops"]["all_reduce"]["wrong"] == 0
    assert "VERDICT: PASS" in job.output()


@pytest.mark.parametrize(
    "to_batch",
    [False, True],
    ids=["scancel-signal-TERM-then-requeue", "time-limit-signal-to-the-batch-step-requeues-itself"],
)
def test_sigterm_checkpoints_and_the_requeued_job_resumes_bitwise(reference, tmp_path, to_batch) -> None:
    """scancel --signal=TERM reaches the tasks: they checkpoint and the job ends, to be requeued by hand.
    With --batch it reaches the batch step only, as sbatch --signal=B:TERM@120 does before the time limit:
    the batch step passes it to the tasks and requeues the job itself."""
    job = submit(
        tmp_path, "train", *train_variables(None, STEPS, *CKPT), env={**ENV, "TORCHRIG_TEST_STEP_SLEEP": "0.5"}
    )
    run_dir = ROOT / "runs" / f"slurm-train-{job.id}"  # no RUN_DIR given: derived from the job id
    try:
        wait_for_step(run_dir, 3, job)
        subprocess.run(["scancel", "--signal=TERM", *(["--batch"] if to_batch else []), job.id], check=True)
        if to_batch:
            assert job.wait(("PENDING",)) == "PENDING", job.output()
        else:
            assert job.wait() == "COMPLETED", job.output()
            subprocess.run(["scontrol", "requeue", job.id], check=True)
        stopped_at = metrics(run_dir)[-1]["step"]
        assert 3 <= stopped_at < STEPS and f"checkpoint saved at step {stopped_at}" in job.output()
        # Slurm holds a requeued job for about two minutes; the cluster's admin (this test) may start it sooner,
        # but not within the second its last run ended: slurmd revoked that run's credential, with one-second
        # resolution, and would kill the new run at once ("Killing non-startable batch job: credential revoked").
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now+3"], check=True)
        assert job.field("Restarts") == "1"
        assert job.wait() == "COMPLETED", job.output()
        assert f"resuming from step {stopped_at}" in job.output()
        params, optim, _ = checkpoint_state(run_dir)
        ref_params, ref_optim, _ = checkpoint_state(reference)
        assert_states_equal(params, ref_params, exact=True)
        for (_, a), (_, b) in zip(sorted(optim["state"].items()), sorted(ref_optim["state"].items()), strict=True):
            assert_states_equal(a, b, exact=True)
        assert {r["step"]: r["loss"] for r in metrics(run_dir)} == {r["step"]: r["loss"] for r in metrics(reference)}
    finally:
        subprocess.run(["scancel", job.id], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_killed_node_task_ends_the_job_naming_the_rank_and_leaves_no_process(tmp_path) -> None:
    run_dir = tmp_path / "run"
    variables = train_variables(run_dir, 200, "train.timeout_s=30", "train.ckpt_every=1000")
    job = submit(tmp_path, "train", *variables, env={**ENV, "TORCHRIG_TEST_STEP_SLEEP": "0.3"})
    wait_for_step(run_dir, 2, job)
    pid, rank = worker_on_node(str(run_dir), 1)
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) == "FAILED", job.output()
    named = [line for line in job.output().splitlines() if line.startswith("torchrig:") and f"rank {rank}" in line]
    assert named, job.output()
    assert "Traceback" not in job.output()
    assert processes_of(str(run_dir)) == []


def test_a_plain_scancel_ends_the_job_for_good_and_leaves_no_process(tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = submit(tmp_path, "train", *train_variables(run_dir, 200), env={**ENV, "TORCHRIG_TEST_STEP_SLEEP": "0.3"})
    wait_for_step(run_dir, 1, job)
    subprocess.run(["scancel", job.id], check=True)
    assert job.wait(("CANCELLED", "COMPLETED", "FAILED", "PENDING"), timeout=60) == "CANCELLED", job.output()
    deadline = time.monotonic() + 30
    while processes_of(str(run_dir)) and time.monotonic() < deadline:  # Slurm ends the steps after KillWait
        time.sleep(0.5)
    assert processes_of(str(run_dir)) == []
    assert job.field("JobState") == "CANCELLED" and job.field("Restarts") == "0"  # not requeued by the batch step


def _image_exists() -> bool:
    docker = shutil.which(os.environ.get("DOCKER", "docker"))
    if docker is None:
        return False
    inspected = subprocess.run([docker, "image", "inspect", IMAGE], capture_output=True, check=False)
    return inspected.returncode == 0


def _memlock() -> str:
    """docker-compose.yml's memlock (unlimited), or this engine's own limit where it cannot grant that (a sandbox)."""
    docker = os.environ.get("DOCKER", "docker")
    probe = [docker, "run", "--rm", "--ulimit", "memlock=-1", IMAGE, "true"]
    if subprocess.run(probe, capture_output=True, check=False, timeout=120).returncode == 0:
        return "-1"
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return "-1" if hard == resource.RLIM_INFINITY else str(hard)


@pytest.mark.timeout(900)  # two containers start (torch imported in each) before the first step
def test_runtime_docker_through_sbatch_trains_like_the_venv(tmp_path) -> None:
    if not _image_exists():
        pytest.skip(f"no image {IMAGE} (make test-image builds it) or no Docker engine answering")
    # Synthetic tokens: the built-in corpus is the running Python's standard library, and the image's Python
    # is not this machine's; the same seed gives the same tokens in both, so the losses must agree bitwise.
    synthetic = [*CKPT, "data.source=synthetic"]
    reference = tmp_path / "venv"
    result = launch_train(reference, 2, STEPS, *synthetic, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "docker"
    run_dir.mkdir(mode=0o777)
    job = submit(
        tmp_path,
        "train",
        "RUNTIME=docker",
        *train_variables(run_dir, STEPS, *synthetic),
        env={**ENV, "TORCHRIG_IMAGE": IMAGE, "TORCHRIG_DOCKER_MEMLOCK": _memlock()},
    )
    assert job.wait(timeout=840) == "COMPLETED", job.output()
    assert losses(run_dir) == losses(reference) and len(losses(run_dir)) == STEPS
    leftovers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=slurm_job={job.id}"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""
