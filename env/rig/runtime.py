"""The dispatcher behind every make target: read and check the variables, choose the runtime, run the CLI.

`make train GPUS=2 CONFIG=tiny` runs `python3 -m env.rig.runtime --from-make train`, which reads
GPUS=2 CONFIG=tiny byte for byte from the MAKEFLAGS make hands its recipe (the Makefile never
expands a value), checks each against MAKE_VARS, the one table of make variables, and turns them
into the CLI's `--flag=value` arguments (`python -m train.launch --gpus=2 --config=tiny`).
This module picks RUNTIME (docker when an engine with the NVIDIA runtime answers, else
local), says which and why, checks GPUS against the visible GPUs before anything starts,
makes .venv from the lock on first use, and then runs the target's Python CLI there or in
the container. It uses only the standard library, since it runs before any venv exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from env.common.cli import UserError, check_workers, count, real, run_cli
from env.rig.profiles import DEFAULT_CUDA, profile

if TYPE_CHECKING:
    from env.rig.docker import EngineStatus

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
LOCK = ROOT / profile(DEFAULT_CUDA).lock  # requirements.txt, the lock .venv is made from
STAMP = VENV / ".torchrig-lock-sha256"
# Measured on the cu121 lock: the installed .venv is 5.2 GB and pip's downloaded wheels, held in its temporary
# directory until the install ends, 2.8 GB. Rounded up, these are what making .venv needs free.
VENV_BYTES = 5.5e9
WHEELS_BYTES = 3.0e9


@dataclass(frozen=True)
class MakeVar:
    """A make variable: the CLI flag it becomes, and what kind of value it takes.

    The one table of them is MAKE_VARS; the Makefile's help lines, the dispatcher, the launcher
    and bench all read it (tests/e2e/test_make_input.py fails when the Makefile and the table differ).
    """

    flag: str  # the flag the target's CLI takes; "" for a positional value or one the dispatcher uses itself
    # "text", "count" (digits 0-9), "real" (a finite number), "switch" (1 adds the bare flag), or
    # "environ": set in the job's environment, where env/rig/docker.py and the job read it
    kind: str = "text"
    config_key: str = ""  # the config key a training shorthand sets (STEPS -> train.steps)


MAKE_VARS: dict[str, MakeVar] = {
    "RUNTIME": MakeVar(""),
    "DOCKER": MakeVar("", "environ"),
    "COMPOSE": MakeVar("", "environ"),
    "CUDA": MakeVar(""),
    "CA_BUNDLE": MakeVar("", "environ"),
    "GPUS": MakeVar("--gpus", "count"),
    "CONFIG": MakeVar("--config"),
    "STEPS": MakeVar("--steps", "count", "train.steps"),
    "MICRO_BATCH": MakeVar("--micro-batch", "count", "train.micro_batch"),
    "ACCUM": MakeVar("--accum", "count", "train.accum"),
    "PRECISION": MakeVar("--precision", config_key="train.precision"),
    "STRATEGY": MakeVar("--strategy", config_key="train.strategy"),
    "SEED": MakeVar("--seed", "count", "train.seed"),
    "RUN_DIR": MakeVar("--run-dir"),
    "ARGS": MakeVar(""),
    "NNODES": MakeVar("--nnodes", "count"),
    "NODE_RANK": MakeVar("--node-rank", "count"),
    "MASTER_ADDR": MakeVar("--master-addr"),
    "MASTER_PORT": MakeVar("--master-port", "count"),
    "MAX_RESTARTS": MakeVar("--max-restarts", "count"),
    "MASTER_WAIT": MakeVar("--master-wait", "count"),
    "SIZES": MakeVar("--sizes"),
    "DTYPE": MakeVar("--dtype"),
    "OPS": MakeVar("--ops"),
    "MIN_BUSBW": MakeVar("--min-busbw", "real"),
    "JSON": MakeVar("--json"),
    "BASELINE": MakeVar("--baseline"),
    "NCCL_JSON": MakeVar("--nccl-json"),
    "COUNTS": MakeVar("--counts"),
    "LINK": MakeVar("--link"),
    "A": MakeVar(""),
    "B": MakeVar(""),
    "INPUT": MakeVar("--input"),
    "OUTPUT": MakeVar("--output"),
    "TOKENIZER": MakeVar("--tokenizer"),
    "VOCAB": MakeVar("--vocab", "count"),
    "FORCE": MakeVar("--force", "switch"),
    "MERGE": MakeVar("--merge", "switch"),
    "TEXT_FIELD": MakeVar("--text-field"),
    "PROCS": MakeVar("--procs", "count"),
    "SHARD_TOKENS": MakeVar("--shard-tokens", "count"),
    "SHARD_FORMAT": MakeVar("--shard-format"),
    "CHAT": MakeVar("--chat", "switch"),
    "SEQ_LEN": MakeVar("--seq-len", "count"),
    "CHAT_TEMPLATE": MakeVar("--chat-template"),
    "ALONE": MakeVar("--alone", "switch"),
    "DATA": MakeVar("--data"),
    "PROMPT": MakeVar("--prompt"),
    "TOKENS": MakeVar("--tokens", "count"),
    "TEMPERATURE": MakeVar("--temperature", "real"),
    "TOP_K": MakeVar("--top-k", "count"),
    "TOP_P": MakeVar("--top-p", "real"),
    "CACHE": MakeVar("--cache"),
    "SPECULATE": MakeVar("--speculate"),
    "SHARD": MakeVar("--shard"),
    "VRAM": MakeVar("--vram", "real"),
}


def shorthand_keys() -> dict[str, str]:
    """CLI flag name (steps, micro_batch) -> the config key it sets, for the launcher and bench."""
    return {v.flag[2:].replace("-", "_"): v.config_key for v in MAKE_VARS.values() if v.config_key}


@dataclass(frozen=True)
class Target:
    """A make target: the Python module it runs and the make variables it takes, in order.

    The `torchrig` console script (env/rig/console.py) makes one subcommand of each.
    """

    module: str
    variables: tuple[str, ...] = ()  # names in MAKE_VARS: flagged ones become `--flag=value`
    positional: tuple[str, ...] = ()  # make variables passed as positional arguments, after `--`
    workers: bool = True  # GPUS counts worker processes it starts (the doctor only judges for that many)
    planned: bool = False  # GPUS is the box planned for (make plan): never checked against this machine's GPUs
    summary: str = ""  # what it does, as its help line in the Makefile begins (`make help`, `torchrig --help`)


RUN_VARS = ("GPUS", "CONFIG", "STEPS", "MICRO_BATCH", "ACCUM", "PRECISION", "STRATEGY", "SEED", "RUN_DIR")
NODE_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS", "MASTER_WAIT")
PREPARE_VARS = ("INPUT", "OUTPUT", "TOKENIZER", "VOCAB", "TEXT_FIELD", "PROCS", "SHARD_TOKENS", "SHARD_FORMAT",
                "FORCE", "CHAT", "SEQ_LEN", "CHAT_TEMPLATE", "ALONE")  # fmt: skip
TARGETS: dict[str, Target] = {
    "train": Target("train.launch", (*RUN_VARS, *NODE_VARS), positional=("ARGS",), summary="train a model"),
    "nccl-test": Target(
        "env.nccl.launch",
        ("GPUS", "SIZES", "DTYPE", "OPS", "MIN_BUSBW", "JSON", "RUN_DIR", *NODE_VARS),
        summary="collective bandwidth + correctness with a verdict",
    ),
    "doctor": Target(
        "env.machine.doctor",
        ("GPUS", "JSON", "RUN_DIR"),
        workers=False,
        summary="check this box: driver, torch stack, shm, PCIe, P2P",
    ),
    "bench": Target(
        "train.bench",
        (*RUN_VARS, "BASELINE", "NCCL_JSON", "COUNTS", "LINK"),
        positional=("ARGS",),
        summary="the 1->N GPU scaling table",
    ),
    "compare": Target(
        "env.records.compare",
        ("OUTPUT",),
        positional=("A", "B"),
        summary="compare two runs' manifests and figures, and overlay their losses in a PNG",
    ),
    "prepare": Target(
        "train.prepare",
        PREPARE_VARS,
        summary="text, JSON lines, Parquet, datasets or llm.c shards into token shards, bytes or BPE; chat with a mask",
    ),
    "eval": Target(
        "train.eval",
        ("GPUS", "RUN_DIR", "DATA", "MICRO_BATCH"),
        summary="validation loss of a run's newest valid checkpoint",
    ),
    "sample": Target(
        "train.sample",
        ("RUN_DIR", "PROMPT", "TOKENS", "TEMPERATURE", "TOP_K", "TOP_P", "SEED", "CACHE", "SPECULATE"),
        summary="text from a run or export",
    ),
    "export": Target(
        "train.export",
        ("RUN_DIR", "OUTPUT", "DTYPE", "SHARD", "FORCE", "MERGE"),
        summary="a run's weights as a Hugging Face model directory, a LoRA run's as a PEFT adapter",
    ),
    "keys": Target(
        "train.config_keys", ("OUTPUT",), workers=False, summary="every config key with its type, default and docstring"
    ),
    "plan": Target(
        "train.plan",
        ("CONFIG", "GPUS", "VRAM", "MICRO_BATCH", "STRATEGY", "PRECISION", "JSON"),
        positional=("ARGS",),
        workers=False,
        planned=True,
        summary="whether a run fits a box's GPUs: memory per GPU by kind, a verdict, the levers",
    ),
}
# Targets the dispatcher runs itself, and the variables they read.
OWN_TARGETS: dict[str, tuple[str, ...]] = {
    "build": ("CUDA", "CA_BUNDLE"),
    "setup": (),
    "shell": (),
    # sbatch from the login node (env/slurm/job.py checks the rest): no runtime is chosen and no GPU counted here.
    "slurm-train": (*RUN_VARS, "MAX_RESTARTS", "NNODES", "ARGS"),
    "slurm-nccl-test": ("GPUS", "SIZES", "DTYPE", "OPS", "MIN_BUSBW", "JSON", "RUN_DIR", "NNODES"),
}
COMMON_VARS = ("RUNTIME", "DOCKER", "COMPOSE")  # every target takes these
# Command-line variables with these prefixes are the job's environment (make train NCCL_DEBUG=INFO), as are
# the trackers' own (make train WANDB_PROJECT=x, MLFLOW_TRACKING_URI=…).
ENVIRONMENT_PREFIXES = ("NCCL_", "TORCH_", "WANDB_", "MLFLOW_")


def target_variables(name: str) -> tuple[str, ...]:
    """The make variables a target takes: what its help line in the Makefile must list."""
    if name in OWN_TARGETS:
        return OWN_TARGETS[name] + COMMON_VARS
    target = TARGETS[name]
    return (*target.variables, *target.positional, *COMMON_VARS)


def _split_makeflags(text: str) -> list[str]:
    """MAKEFLAGS as make wrote it: words split at blanks, `\\x` is x and `$$` is `$` (make's quote_for_env)."""
    words: list[str] = []
    word: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            word.append(next(chars, "\\"))
        elif char == "$":
            if next(chars, "") != "$":
                raise UserError("MAKEFLAGS holds an unquoted '$'; run make without -e and without setting MAKEFLAGS")
            word.append("$")
        elif char in " \t":
            if word:
                words.append("".join(word))
            word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    return words


def make_command_line(makeflags: str) -> dict[str, str]:
    """The variables given on make's command line, byte for byte, from the MAKEFLAGS make hands its recipes.

    The Makefile never expands them (a `$(shell ...)` in a value would run, a `$x` would vanish) and
    unexports them (make would expand them for the recipe's environment): MAKEFLAGS keeps them quoted.
    """
    words = _split_makeflags(makeflags)
    if "--" not in words:
        return {}
    values: dict[str, str] = {}
    for word in words[words.index("--") + 1 :]:
        name, _, value = word.partition("=")
        if name.endswith(":") or not name:
            raise UserError(f"'{word}': give make variables as NAME=value (make evaluates NAME:=value itself)")
        values[name] = value
    return values


def parse_assignments(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"unexpected argument '{item}'; pass make variables as NAME=value")
        values[name] = value
    return values


def check_values(target_name: str, values: dict[str, str], label: Callable[[str], str] = str) -> None:
    """Refuse in one line what no target could mean: an unknown variable, a control character, a bad number.

    label names a variable in a message as the user gave it: make's NAME, or the console's --flag.
    """
    taken = target_variables(target_name)
    for name, value in values.items():
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise UserError(f"{label(name)} holds a newline or another control character; give it on one line")
        if name.startswith(ENVIRONMENT_PREFIXES):
            continue
        if name not in MAKE_VARS:
            raise UserError(f"{name} is not a torchrig make variable; `make help` lists each target's variables")
        if value and name not in taken:
            raise UserError(f"make {target_name} does not take {name}; it takes {', '.join(taken)}")
        kind = MAKE_VARS[name].kind
        if name == "ARGS":
            split_args(value)
        elif value and kind == "count":
            count(value, label(name))
        elif value and kind == "real":
            real(value, label(name))
        elif value and kind == "switch" and value not in ("0", "1"):
            raise UserError(f"{name}={value!r}: give {name}=1 to turn it on (or leave it out)")


def ignored_environment(values: dict[str, str], environ: dict[str, str]) -> list[str]:
    """Make variables set in the shell's environment but not on make's command line: torchrig ignores them."""
    return sorted(
        name for name, var in MAKE_VARS.items() if var.kind != "environ" and name in environ and name not in values
    )


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


def choose_runtime(requested: str) -> tuple[str, str, EngineStatus | None]:
    """('docker' | 'local', why, the engine's status when it was asked)."""
    if requested not in ("", "docker", "local"):
        raise UserError(f"RUNTIME={requested} is not docker or local")
    if requested:
        return requested, "RUNTIME was set", None
    from env.rig.docker import engine_status

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
            raise UserError(
                f"making .venv needs about {size / 1e9:.1f} GB free on the disk holding {where} "
                f"(the venv plus pip's downloads) and it has {free / 1e9:.1f} GB; {_DISK_FIX}"
            )


@contextlib.contextmanager
def _one_install_at_a_time() -> Iterator[None]:
    """An exclusive flock on .build/venv.lock while .venv is made: a second make started meanwhile (another
    terminal, a test suite beside another) waits for the first install instead of installing over it."""
    lock = ROOT / ".build" / "venv.lock"
    try:
        lock.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot make {lock.parent} for make's lock ({exc.strerror}); remove it if it is not a directory, "
            "or run make as the user who owns this checkout"
        ) from None
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        fix = (
            "run make as the user who owns this checkout"
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else "remove it: it is a link or not a file"
        )
        raise UserError(f"cannot open make's lock {lock} ({exc.strerror}); {fix}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"torchrig: another make is making .venv (it holds {lock}); waiting for it to finish", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _venv_ready(python: Path) -> bool:
    return python.exists() and STAMP.exists() and STAMP.read_text().strip() == _lock_digest()


def ensure_venv() -> Path:
    """.venv made from requirements.txt with --require-hashes; remade when the lock changes; one install at a time."""
    python = VENV / "bin" / "python"
    if _venv_ready(python):
        return python
    with _one_install_at_a_time():
        if _venv_ready(python):  # made by the make this one waited for
            return python
        return _make_venv(python)


def _make_venv(python: Path) -> Path:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file runs under any system python3
        raise UserError(f"Python {sys.version.split()[0]} is too old; torchrig needs python3 >= 3.10")
    if not python.exists():  # a first install; updating a venv for a changed lock needs only the changes' room
        check_disk_for_venv()
    print(f"torchrig: making .venv from {LOCK.name} (first use: 5.2 GB installed, a few minutes)", flush=True)
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=False)
        if made.returncode != 0:
            raise UserError("python3 -m venv failed; install your distribution's python3-venv package")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--require-hashes", "-r", str(LOCK)]
    if subprocess.run(pip, check=False).returncode != 0:
        full = [where for where, _ in _venv_disk_needs() if shutil.disk_usage(where).free < 0.5e9]
        if full:
            raise UserError(f"the disk holding {full[0]} filled up while installing .venv; {_DISK_FIX}")
        raise UserError("installing requirements.txt into .venv failed (see pip's message above); fix it, then rerun")
    STAMP.write_text(_lock_digest())
    return python


def is_override(word: str) -> bool:
    """A key=value config override, not a flag: a flag would bypass the checks of its variable."""
    return not word.startswith("-") and "=" in word


def split_args(text: str) -> list[str]:
    """ARGS as key=value overrides (shell quoting allowed); a flag in ARGS would bypass the checks of its variable."""
    try:
        words = shlex.split(text)
    except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
        raise UserError(
            f"ARGS={text!r}: {str(exc).lower()}; quote each value once, e.g. ARGS=\"name='my run'\""
        ) from None
    for word in words:
        if not is_override(word):
            raise UserError(
                f"ARGS holds '{word}': ARGS takes key=value config overrides only (e.g. ARGS=\"train.lr=3e-4\"); "
                "flags have their own make variables (GPUS, STEPS, ...: `make help`)"
            )
    return words


def job_argv(target: Target, values: dict[str, str], visible: int, label: Callable[[str], str] = str) -> list[str]:
    """The target's CLI argv, with GPUS checked against the visible GPUs; says so when GPUS counts CPU processes."""
    gpus = None
    if "GPUS" in target.variables:
        # Unset GPUS is left to each CLI, which applies the same check_workers default.
        given = values.get("GPUS", "")
        gpus = count(given, label("GPUS")) if given else None
        if gpus is not None and not target.planned:
            gpus = check_workers(gpus, visible, label("GPUS"))
        if visible == 0 and target.workers:
            many = f"{gpus} CPU process(es)" if gpus else "CPU processes"
            print(
                f"torchrig: no GPU visible: {many} on gloo (testing mode: same code path, slower)",
                file=sys.stderr,
                flush=True,
            )
    return build_argv(target, values, gpus)


def build_argv(target: Target, values: dict[str, str], gpus: int | None) -> list[str]:
    """The CLI's argv: `--flag=value` (so that a value starting with '-' stays a value), positionals after `--`."""
    argv = ["python", "-m", target.module]
    if gpus is not None:
        argv.append(f"--gpus={gpus}")
    for var in target.variables:
        value = values.get(var, "")
        if var == "GPUS" or value == "":
            continue
        flag = MAKE_VARS[var].flag
        if MAKE_VARS[var].kind == "switch":
            argv += [flag] if value == "1" else []
        else:
            argv.append(f"{flag}={value}")
    positional: list[str] = []
    for var in target.positional:
        if var == "ARGS":
            positional += split_args(values.get("ARGS", ""))
        elif values.get(var, "") != "":
            positional.append(values[var])
    return [*argv, "--", *positional] if positional else argv


SLURM_TARGETS = ("slurm-train", "slurm-nccl-test")


def run(target_name: str, values: dict[str, str]) -> int:
    check_values(target_name, values)
    for name, value in values.items():
        if name.startswith(ENVIRONMENT_PREFIXES) or (name in MAKE_VARS and MAKE_VARS[name].kind == "environ"):
            os.environ[name] = value  # byte for byte, as make's command line gave it
    if target_name in SLURM_TARGETS:
        command = [sys.executable, "-m", "env.slurm.job", "submit", target_name.removeprefix("slurm-")]
        os.chdir(ROOT)
        os.execv(sys.executable, [*command, *(f"{name}={value}" for name, value in values.items())])
    if target_name == "build":
        from env.rig.docker import build_image
        from env.rig.profiles import DEFAULT_CUDA

        return build_image(values.get("CUDA") or DEFAULT_CUDA)
    runtime, why, engine = choose_runtime(values.get("RUNTIME", ""))
    print(f"torchrig: runtime={runtime} ({why})", file=sys.stderr, flush=True)
    if target_name == "setup":
        if runtime == "local":
            ensure_venv()
        return 0
    target = TARGETS.get(target_name)
    takes_gpus = target is not None and "GPUS" in target.variables
    # nvidia-smi only where the answer is used: GPUS checks, and the container's gpu or cpu service.
    visible = visible_gpu_count() if runtime == "docker" or takes_gpus else 0
    argv = ["bash"] if target is None else job_argv(target, values, visible)  # None: shell
    if runtime == "docker":
        from env.rig.docker import passthrough_env, run_in_container

        return run_in_container(argv, gpu=visible > 0, env=passthrough_env(), status=engine)
    python = ensure_venv()
    argv[0] = str(python) if argv[0] == "python" else argv[0]
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.chdir(ROOT)
    os.execve(shutil.which(argv[0], path=env["PATH"]) or argv[0], argv, env)
    return 0  # not reached: execve replaces this process, so signals reach the job directly


def main(argv: list[str] | None = None) -> int:
    """`python3 -m env.rig.runtime [--from-make] TARGET [NAME=value ...]`.

    --from-make (the Makefile's recipes) reads the variables of make's command line from MAKEFLAGS;
    NAME=value arguments come after and win. Variables only set in the shell's environment are ignored,
    with a note, so that a stale `export SEED=...` never changes a run unseen.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    from_make = bool(args) and args[0] == "--from-make"
    args = args[1:] if from_make else args
    known = sorted([*TARGETS, *OWN_TARGETS])
    if not args or args[0] not in known:
        raise UserError(f"unknown target {args[0] if args else '(none)'}; one of: {', '.join(known)}")
    values = make_command_line(os.environ.get("MAKEFLAGS", "")) if from_make else {}
    values |= parse_assignments(args[1:])
    ignored = ignored_environment(values, dict(os.environ))
    if ignored:
        print(
            f"torchrig: ignoring {', '.join(ignored)} from the shell's environment; "
            "only make's command line sets torchrig variables (e.g. make train SEED=3)",
            file=sys.stderr,
            flush=True,
        )
    return run(args[0], values)


if __name__ == "__main__":
    run_cli("make", main)
