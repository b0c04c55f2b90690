"""The Python side of env/slurm/*.sbatch: check a job's make variables, start it on every node, preempt it.

    python3 -m env.slurm.job submit TARGET VAR=value ...   make slurm-train / slurm-nccl-test: sbatch, no shell
    python3 -m env.slurm.job batch TARGET VAR=value ...    the batch step (train.sbatch execs it on the first node)
    python3 -m env.slurm.job node TARGET ADDR PORT VAR=value ...   each node's srun task

TARGET is `train` or `nccl-test`; the variables are make's (CONFIG, STEPS, ..., RUNTIME=local|docker|pyxis),
checked here by name and then by the same code as `make TARGET` (env.rig.runtime and the target's CLI). Slurm
owns the node flags: NNODES is the allocation's node count, NODE_RANK the task's SLURM_NODEID, and the c10d
rendezvous meets on the first node's address under the job id. Values are only ever passed as separate
arguments (never to a shell), so nothing in them is evaluated.

Preemption: sbatch's `--signal=B:TERM@120` reaches the batch step; it forwards SIGTERM to the job's tasks
(the workers checkpoint at the next step boundary and exit 0) and requeues the job, which resumes from
that checkpoint in the same RUN_DIR (by default derived from the job id, so stable across requeues). A
SIGTERM sent to the tasks themselves (`scancel --signal=TERM JOB`) checkpoints and ends the job instead.
Standard library only: it runs with the system python3, before any venv exists.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from env.common.cli import UserError, check_workers, count, one_line, run_cli
from env.rig.runtime import (
    NODE_VARS,
    ROOT,
    TARGETS,
    build_argv,
    parse_assignments,
    visible_gpu_count,
)

# sbatch answers in a second; a controller that is down makes it retry for a while (MessageTimeout, per attempt).
SBATCH_TIMEOUT_S = 120
SBATCH_FILES = {"train": ROOT / "env/slurm/train.sbatch", "nccl-test": ROOT / "env/slurm/nccl-test.sbatch"}
RUNTIMES = ("local", "docker", "pyxis")
# Seconds a container has to checkpoint after SIGTERM before it is killed: less than Slurm's KillWait
# (30 s by default), after which Slurm kills this process and a container would outlive the job.
CONTAINER_GRACE_S = 20
# The variables Slurm decides; NNODES is also how `make slurm-*` asks for nodes.
SLURM_OWNED = tuple(name for name in NODE_VARS if name not in ("MAX_RESTARTS", "MASTER_WAIT"))


def allowed_variables(target: str) -> list[str]:
    spec = TARGETS[target]
    names = {"RUNTIME", "GPUS", *spec.variables, *spec.positional} - set(SLURM_OWNED)
    return sorted(names)


def check_variables(target: str, values: dict[str, str]) -> None:
    """The checks make's dispatcher does before anything starts, plus the variables Slurm owns."""
    allowed = allowed_variables(target)
    for name in values:
        if name in SLURM_OWNED:
            raise UserError(f"{name} is set by Slurm here (sbatch --nodes, the node's place, the first node); drop it")
        if name not in allowed:
            raise UserError(f"unknown variable {name} for the Slurm {target}; one of {', '.join(allowed)}")
    runtime = values.get("RUNTIME", "local")
    if runtime not in RUNTIMES:
        raise UserError(f"RUNTIME={runtime} is not one of {', '.join(RUNTIMES)} (local: the .venv)")
    if values.get("GPUS", ""):
        check_workers(count(values["GPUS"], "GPUS"), 0)


def _target(name: str) -> str:
    if name not in SBATCH_FILES:
        raise UserError(f"unknown target {name}; one of {', '.join(SBATCH_FILES)}")
    return name


def _job_id() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise UserError("SLURM_JOB_ID is not set: submit this with sbatch (or make slurm-train), not directly")
    return job


def default_run_dir(target: str, job: str) -> str:
    """Stable across requeues (the job id stays), and shared: relative to the submit directory."""
    return f"runs/slurm-{target}-{job}"


# ---- make slurm-*: submit -------------------------------------------------------------------------------


def sbatch_command(target: str, values: dict[str, str]) -> list[str]:
    """sbatch with the node count (NNODES) and GPUs per node (GPUS) as its options, the rest for the script."""
    options = dict(values)
    nodes = options.pop("NNODES", "") or "1"
    if not nodes.isdigit() or int(nodes) < 1:
        raise UserError(f"NNODES={nodes} is not a whole number of at least 1; e.g. NNODES=2")
    gpus = options.pop("GPUS", "")
    check_variables(target, {**options, **({"GPUS": gpus} if gpus else {})})
    command = ["sbatch", f"--nodes={nodes}"]
    if gpus:
        command.append(f"--gpus-per-node={gpus}")
    return [*command, str(SBATCH_FILES[target]), *(f"{name}={value}" for name, value in options.items())]


def submit(target: str, values: dict[str, str]) -> int:
    """sbatch the job; its answer ("Submitted batch job N") on stdout, or why it refused in one line."""
    command = sbatch_command(_target(target), values)
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run this on a Slurm login node (or load the slurm module)")
    print(f"torchrig: {one_line(shlex.join(command))}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"sbatch gave no answer in {SBATCH_TIMEOUT_S} s; is slurmctld up and reachable (`sinfo` should answer)?"
        ) from None
    if done.returncode != 0:
        # sbatch's own report is several lines (an unconfigured client: DNS SRV lookups, then "fatal"): keep its last.
        said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = one_line(said[-1]) if said else f"exit code {done.returncode}"
        raise UserError(
            f"sbatch refused the job: {reason}; check that this is a Slurm login node with a working slurm.conf "
            "(`sinfo` should answer) and that the partition takes the job"
        )
    sys.stdout.write(done.stdout)
    return 0


# ---- the batch step ----------------------------------------------------------------------------------------


def first_node_address() -> str:
    """The first node of the allocation, as the address its slurmd listens on (NodeAddr)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    first = names.stdout.split()[0]
    return _scontrol_fields("node", first).get("NodeAddr") or first


def _scontrol_fields(kind: str, name: str) -> dict[str, str]:
    """`scontrol show KIND NAME` as its Key=Value fields; empty when scontrol does not know it."""
    shown = subprocess.run(["scontrol", "show", kind, "-o", name], capture_output=True, text=True, check=False)
    return dict(item.partition("=")[::2] for item in shown.stdout.split())


def free_port() -> int:
    """A port free now on this node, which is the allocation's first: the rendezvous store listens there."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def srun_command(target: str, values: dict[str, str], addr: str, port: int) -> list[str]:
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
    command = ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", "--ntasks-per-node=1", f"--ntasks={nodes}"]
    python = "python3"
    if values.get("RUNTIME") == "pyxis":
        mounts = [f"{ROOT / 'runs'}:/workspace/runs", f"{ROOT / 'data'}:/workspace/data"]
        run_dir = Path(values["RUN_DIR"])
        if run_dir.is_absolute():
            mounts.append(f"{run_dir}:{run_dir}")
        image = os.environ.get("TORCHRIG_IMAGE", "torchrig:latest")
        command += [f"--container-image={image}", f"--container-mounts={','.join(mounts)}"]
        command.append("--container-workdir=/workspace")
        python = "python"  # the image's venv
    node_args = [f"{name}={value}" for name, value in values.items()]
    return [*command, python, "-m", "env.slurm.job", "node", target, addr, str(port), *node_args]


class Preemption:
    """SIGTERM to the batch step (sbatch --signal=B:TERM@...): pass it to the tasks, then requeue.

    Through scancel, which signals the job's steps (not this batch step): srun itself would answer a
    SIGTERM by killing its tasks, before they could checkpoint.
    """

    def __init__(self, job: str) -> None:
        self.job = job
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum: int, _frame: object) -> None:
        self.requested = True
        subprocess.run(["scancel", "--signal=TERM", self.job], check=False)


def batch(target: str, values: dict[str, str]) -> int:
    target = _target(target)
    check_variables(target, values)
    job = _job_id()
    values = {**values, "RUN_DIR": values.get("RUN_DIR") or default_run_dir(target, job)}
    if target == "train" and os.environ.get("SLURM_RESTART_COUNT"):
        print(f"torchrig: job {job} restart {os.environ['SLURM_RESTART_COUNT']}: resuming in {values['RUN_DIR']}")
    if values.get("RUNTIME") == "pyxis":  # the container mounts these; enroot refuses a missing source
        for path in (ROOT / "runs", ROOT / "data"):
            path.mkdir(exist_ok=True)
    preemption = Preemption(job)
    command = srun_command(target, values, first_node_address(), free_port())
    print(
        f"torchrig: job {job} on {os.environ.get('SLURM_JOB_NODELIST', '?')}: {one_line(shlex.join(command))}",
        flush=True,
    )
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    # Only a running job is requeued: a plain scancel also sends SIGTERM here, and a cancelled job stays cancelled.
    if preemption.requested and target == "train" and _scontrol_fields("job", job).get("JobState") == "RUNNING":
        print(f"torchrig: job {job} preempted (exit {code}); requeueing it to resume from its checkpoint", flush=True)
        requeued = subprocess.run(["scontrol", "requeue", job], check=False)
        return code if requeued.returncode == 0 else requeued.returncode or 1
    return code


# ---- one node's task ---------------------------------------------------------------------------------------


def node_values(values: dict[str, str], addr: str, port: str) -> dict[str, str]:
    """The make variables of this node: the user's, plus the node flags and GPUs from Slurm."""
    gpus = values.get("GPUS") or _allocated_gpus() or "1"
    return {
        **values,
        "GPUS": gpus,
        "NNODES": os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1",
        "NODE_RANK": os.environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def _allocated_gpus() -> str:
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit() and int(on_node) > 0:
        return on_node
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return str(len(visible)) if visible else ""


def rendezvous_env(job: str) -> dict[str, str]:
    """torchrun's c10d rendezvous (env/rig/launch.py reads PET_RDZV_BACKEND as torchrun does), keyed by the job id.

    The restart count is part of the id: a requeued job must not meet the keys of its previous run.
    """
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"PET_RDZV_BACKEND": "c10d", "TORCHELASTIC_RUN_ID": f"slurm-{job}-{restart}"}


def node(target: str, addr: str, port: str, values: dict[str, str]) -> int:
    target = _target(target)
    check_variables(target, values)
    job = _job_id()
    values = node_values(values, addr, port)
    env = {**os.environ, **rendezvous_env(job)}
    runtime = values.pop("RUNTIME", "local")
    if runtime == "local":  # make's own dispatcher: the .venv from the lock, the same checks, exec
        assignments = [f"{name}={value}" for name, value in values.items()]
        os.execve(sys.executable, [sys.executable, "-m", "env.rig.runtime", target, "RUNTIME=local", *assignments], env)
    gpus = check_workers(count(values["GPUS"], "GPUS"), visible_gpu_count()) if values.get("GPUS") else None
    argv = build_argv(TARGETS[target], values, gpus)
    if runtime == "pyxis":  # already inside the image (srun --container-image): its python is on PATH
        os.execvpe(argv[0], argv, env)
    return run_container(argv, values, env, job)


def container_name(job: str) -> str:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return f"torchrig-{job}-{restart}-node{os.environ.get('SLURM_NODEID', '0')}"


def docker_command(argv: Sequence[str], values: dict[str, str], env: dict[str, str], name: str, gpu: bool) -> list[str]:
    """docker run of the image, as compose's service runs it (host network and IPC, tini), named after the job."""
    passed = {k: v for k, v in env.items() if k.startswith(("NCCL_", "TORCH_", "TORCHRIG_", "GLOO_", "PET_"))}
    passed |= {k: env[k] for k in ("TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in env}
    mounts = [f"{ROOT / 'runs'}:/workspace/runs", f"{ROOT / 'data'}:/workspace/data"]
    run_dir = Path(values["RUN_DIR"])
    if run_dir.is_absolute():
        mounts.append(f"{run_dir}:{run_dir}")
    docker = os.environ.get("DOCKER", "docker")
    command = [docker, "run", "--rm", "--name", name, "--label", f"slurm_job={env.get('SLURM_JOB_ID', '')}"]
    # memlock as docker-compose.yml asks (unlimited); an engine without CAP_SYS_RESOURCE (rootless, a sandbox)
    # cannot grant that, and TORCHRIG_DOCKER_MEMLOCK (bytes) lowers it there.
    memlock = os.environ.get("TORCHRIG_DOCKER_MEMLOCK", "-1")
    command += ["--init", "--network", "host", "--ipc", "host", "--ulimit", f"memlock={memlock}", "-w", "/workspace"]
    # The node's PID namespace, as pyxis (enroot) runs: torchrun's c10d rendezvous tells nodes apart by host
    # name and pid, and in private namespaces every container's launcher has the same pid, so two nodes whose
    # names resolve alike (localhost on a misconfigured image, or two slurmd on one host) would wait forever.
    command += ["--pid", "host"]
    command += ["--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
    if gpu:
        command += ["--gpus", "all"]
    command += [option for mount in mounts for option in ("-v", mount)]
    command += [option for key, value in sorted(passed.items()) for option in ("-e", f"{key}={value}")]
    return [*command, env.get("TORCHRIG_IMAGE", "torchrig:latest"), *argv]


def run_container(argv: list[str], values: dict[str, str], env: dict[str, str], job: str) -> int:
    """The container runs outside Slurm's process tree, so this task stops it: SIGTERM is passed to it,
    and it is killed after CONTAINER_GRACE_S, or at once when this task ends any other way."""
    name = container_name(job)
    docker = os.environ.get("DOCKER", "docker")
    for path in (ROOT / "runs", ROOT / "data"):
        path.mkdir(exist_ok=True)
    process = subprocess.Popen(docker_command(argv, values, env, name, visible_gpu_count() > 0))

    def stop(signum: int, _frame: object) -> None:
        subprocess.run([docker, "kill", "--signal", "TERM", name], capture_output=True, check=False)
        try:
            process.wait(timeout=CONTAINER_GRACE_S)
        except subprocess.TimeoutExpired:
            subprocess.run([docker, "kill", name], capture_output=True, check=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return process.wait()
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, check=False)


# ---- command line ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = ("submit", "batch", "node")
    if len(args) < 2 or args[0] not in commands:
        raise UserError(f"usage: python3 -m env.slurm.job {{{'|'.join(commands)}}} TARGET [VAR=value ...]")
    command, target, rest = args[0], args[1], args[2:]
    if command == "node":
        if len(rest) < 2:
            raise UserError("node needs the first node's address and port before the variables")
        return node(target, rest[0], rest[1], parse_assignments(rest[2:]))
    values = parse_assignments(rest)
    return submit(target, values) if command == "submit" else batch(target, values)


if __name__ == "__main__":
    run_cli("slurm", main)
