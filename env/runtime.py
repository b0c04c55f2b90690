"""The dispatcher behind every make target: choose the runtime, validate GPUS, run the CLI.

`make train GPUS=2 CONFIG=tiny` becomes `python3 -m env.runtime train GPUS=2 CONFIG=tiny`.
This module picks RUNTIME (docker when an engine with the NVIDIA runtime answers, else
local), says which and why, checks GPUS against the visible GPUs before anything starts,
makes .venv from the lock on first use, and then runs the target's Python CLI there or in
the container. It uses only the standard library, since it runs before any venv exists.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from env.docker import EngineStatus

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.txt"
STAMP = VENV / ".torchrig-lock-sha256"
MAX_CPU_PROCESSES = 8
# Measured on the cu121 lock: the installed .venv is 5.2 GB and pip's downloaded wheels, held in its temporary
# directory until the install ends, 2.8 GB. Rounded up, these are what making .venv needs free.
VENV_BYTES = 5.5e9
WHEELS_BYTES = 3.0e9


class UsageError(ValueError):
    """Bad input from the make command line; printed as one line, exit 2."""


@dataclass(frozen=True)
class Target:
    """A make target: the Python module it runs and how make variables become its flags."""

    module: str
    flags: dict[str, str] = field(default_factory=dict)  # make variable -> CLI flag
    positional: tuple[str, ...] = ()  # make variables passed as positional arguments
    gpus: bool = False  # validates GPUS and passes it as --gpus
    workers: bool = True  # GPUS counts worker processes it starts (the doctor only judges for that many)


RUN_FLAGS = {
    "CONFIG": "--config",
    "STEPS": "--steps",
    "RUN_DIR": "--run-dir",
    "SEED": "--seed",
    "MICRO_BATCH": "--micro-batch",
    "ACCUM": "--accum",
    "PRECISION": "--precision",
    "STRATEGY": "--strategy",
}
NODE_FLAGS = {
    "NNODES": "--nnodes",
    "NODE_RANK": "--node-rank",
    "MASTER_ADDR": "--master-addr",
    "MASTER_PORT": "--master-port",
    "MAX_RESTARTS": "--max-restarts",
}
TARGETS: dict[str, Target] = {
    "train": Target("train.launch", {**RUN_FLAGS, **NODE_FLAGS}, positional=("ARGS",), gpus=True),
    "nccl-test": Target(
        "env.nccl_test",
        {
            "SIZES": "--sizes",
            "DTYPE": "--dtype",
            "OPS": "--ops",
            "MIN_BUSBW": "--min-busbw",
            "JSON": "--json",
            "RUN_DIR": "--run-dir",
            **NODE_FLAGS,
        },
        gpus=True,
    ),
    "doctor": Target("env.doctor", {"JSON": "--json", "RUN_DIR": "--run-dir"}, gpus=True, workers=False),
    "bench": Target(
        "train.bench",
        {**RUN_FLAGS, "BASELINE": "--baseline", "NCCL_JSON": "--nccl-json", "COUNTS": "--counts", "LINK": "--link"},
        positional=("ARGS",),
        gpus=True,
    ),
    "compare": Target("env.compare", positional=("A", "B")),
    "prepare": Target("train.prepare", {"INPUT": "--input", "OUTPUT": "--output"}),
    "sample": Target(
        "train.sample",
        {
            "RUN_DIR": "--run-dir",
            "PROMPT": "--prompt",
            "TOKENS": "--tokens",
            "TEMPERATURE": "--temperature",
            "TOP_K": "--top-k",
            "TOP_P": "--top-p",
            "SEED": "--seed",
            "CACHE": "--cache",
            "SPECULATE": "--speculate",
        },
    ),
    "export": Target(
        "train.export", {"RUN_DIR": "--run-dir", "OUTPUT": "--output", "DTYPE": "--dtype", "FORCE": "--force"}
    ),
}


def parse_assignments(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"unexpected argument '{item}'; pass make variables as NAME=value")
        values[name] = value
    return values


def visible_gpu_count() -> int:
    """GPUs this process may use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    count = sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return count


def validate_gpus(raw: str, visible: int) -> int:
    """GPUS as a count of worker processes; a clear UsageError for anything else."""
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"GPUS={raw} is not a whole number of at least 1; e.g. GPUS=2")
    gpus = int(raw)
    if visible > 0 and gpus > visible:
        raise UsageError(
            f"GPUS={gpus} but only {visible} GPU(s) are visible (nvidia-smi -L); use GPUS={visible} or fewer"
        )
    if visible == 0 and gpus > MAX_CPU_PROCESSES:
        raise UsageError(
            f"GPUS={gpus}: no GPU is visible, so GPUS counts CPU processes on gloo, at most {MAX_CPU_PROCESSES}"
        )
    return gpus


def choose_runtime(requested: str) -> tuple[str, str, EngineStatus | None]:
    """('docker' | 'local', why, the engine's status when it was asked)."""
    if requested not in ("", "docker", "local"):
        raise UsageError(f"RUNTIME={requested} is not docker or local")
    if requested:
        return requested, "RUNTIME was set", None
    from env.docker import engine_status

    status = engine_status()
    if status.answers and status.nvidia:
        return "docker", "a Docker engine with the NVIDIA runtime answers", status
    return "local", f"{status.reason}; RUNTIME=docker forces the container", status


def _lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


_DISK_FIX = "free some space (`pip cache purge` frees pip's cache) or set TMPDIR to a roomier disk, then rerun"


def _venv_disk_needs() -> list[tuple[Path, float]]:
    """(a directory, bytes needed there) for the venv and pip's temporary files, one entry per filesystem."""
    needs: dict[int, tuple[Path, float]] = {}
    for where, size in ((ROOT, VENV_BYTES), (Path(tempfile.gettempdir()), WHEELS_BYTES)):
        device = where.stat().st_dev
        held = needs.get(device, (where, 0.0))
        needs[device] = (held[0], held[1] + size)
    return list(needs.values())


def check_disk_for_venv() -> None:
    """Refuse, in one line, to start an install that the disk cannot hold, rather than fail half-way."""
    for where, size in _venv_disk_needs():
        free = shutil.disk_usage(where).free
        if free < size:
            raise UsageError(
                f"making .venv needs about {size / 1e9:.1f} GB free on the disk holding {where} "
                f"(the venv plus pip's downloads) and it has {free / 1e9:.1f} GB; {_DISK_FIX}"
            )


def ensure_venv() -> Path:
    """.venv made from requirements.txt with --require-hashes; remade when the lock changes."""
    python = VENV / "bin" / "python"
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == _lock_digest():
        return python
    if sys.version_info < (3, 10):  # noqa: UP036 - this file runs under any system python3
        raise UsageError(f"Python {sys.version.split()[0]} is too old; torchrig needs python3 >= 3.10")
    if not python.exists():  # a first install; updating a venv for a changed lock needs only the changes' room
        check_disk_for_venv()
    print(f"torchrig: making .venv from {LOCK.name} (first use: 5.2 GB installed, a few minutes)", flush=True)
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=False)
        if made.returncode != 0:
            raise UsageError("python3 -m venv failed; install your distribution's python3-venv package")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--require-hashes", "-r", str(LOCK)]
    if subprocess.run(pip, check=False).returncode != 0:
        full = [where for where, _ in _venv_disk_needs() if shutil.disk_usage(where).free < 0.5e9]
        if full:
            raise UsageError(f"the disk holding {full[0]} filled up while installing .venv; {_DISK_FIX}")
        raise UsageError("installing requirements.txt into .venv failed (see pip's message above); fix it, then rerun")
    STAMP.write_text(_lock_digest())
    return python


def build_argv(target: Target, values: dict[str, str], gpus: int | None) -> list[str]:
    argv = ["python", "-m", target.module]
    if gpus is not None:
        argv += ["--gpus", str(gpus)]
    for var, flag in target.flags.items():
        if values.get(var, "") != "":
            argv += [flag, values[var]]
    for var in target.positional:
        if var == "ARGS":
            argv += shlex.split(values.get("ARGS", ""))
        elif values.get(var, "") != "":
            argv.append(values[var])
    return argv


def run(target_name: str, values: dict[str, str]) -> int:
    if target_name == "build":
        from env.docker import build_image
        from env.profiles import DEFAULT_CUDA

        return build_image(values.get("CUDA") or DEFAULT_CUDA)
    runtime, why, engine = choose_runtime(values.get("RUNTIME", ""))
    print(f"torchrig: runtime={runtime} ({why})", file=sys.stderr, flush=True)
    if target_name == "setup":
        if runtime == "local":
            ensure_venv()
        return 0
    # nvidia-smi only where the answer is used: GPUS checks, and the container's gpu or cpu service.
    counts_gpus = runtime == "docker" or (target_name != "shell" and TARGETS[target_name].gpus)
    visible = visible_gpu_count() if counts_gpus else 0
    if target_name == "shell":
        argv = ["bash"]
    else:
        target = TARGETS[target_name]
        gpus = None
        if target.gpus:
            # Unset GPUS is left to each CLI: every visible GPU, or its own CPU default.
            gpus = validate_gpus(values["GPUS"], visible) if values.get("GPUS", "") else None
            if visible == 0 and target.workers:
                count = f"{gpus} CPU process(es)" if gpus else "CPU processes"
                print(
                    f"torchrig: no GPU visible: {count} on gloo (testing mode: same code path, slower)",
                    file=sys.stderr,
                    flush=True,
                )
        argv = build_argv(target, values, gpus)
    if runtime == "docker":
        from env.docker import passthrough_env, run_in_container

        return run_in_container(argv, gpu=visible > 0, env=passthrough_env(), status=engine)
    python = ensure_venv()
    argv[0] = str(python) if argv[0] == "python" else argv[0]
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.chdir(ROOT)
    os.execve(shutil.which(argv[0], path=env["PATH"]) or argv[0], argv, env)
    return 0  # not reached: execve replaces this process, so signals reach the job directly


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    known = sorted([*TARGETS, "build", "setup", "shell"])
    if not args or args[0] not in known:
        print(f"torchrig: unknown target {args[0] if args else '(none)'}; one of: {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        return run(args[0], parse_assignments(args[1:]))
    except UsageError as exc:
        print(f"torchrig: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
