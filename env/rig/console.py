"""`torchrig TARGET [--variable value ...]`: the make targets as one console script, for an installed torchrig.

Each subcommand is a row of TARGETS in env/rig/runtime.py, and its flags are that target's make
variables from MAKE_VARS, lower-case and dashed (GPUS -> --gpus, RUN_DIR -> --run-dir, FORCE=1 ->
--force); ARGS are the key=value words after the flags. They are checked by the same code as
`make TARGET NAME=value`, then the target's CLI runs in this Python: the installed environment, as
RUNTIME=local but without making .venv and without a container. It replaces this process, so its
exit code is torchrig's (the doctor's 1 and bench's 3 reach the shell; make turns them into 2) and
signals reach it directly. The Makefile stays the front door: the targets only it runs are refused
in one line that names them.
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from collections.abc import Sequence

from env.common.cli import ArgumentParser, UserError, exit_code
from env.rig.runtime import MAKE_VARS, TARGETS, Target, check_values, is_override, job_argv, visible_gpu_count

# Make targets with no subcommand here, and why: each needs the checkout (its Makefile, Dockerfile,
# tests or scripts) or a runtime choice that an installed torchrig does not make.
MAKE_ONLY: dict[str, str] = {
    "setup": "it makes the checkout's .venv; an installed torchrig runs in the environment it is installed in",
    "build": "the image is built from the checkout's Dockerfile",
    "shell": "it opens a shell in the runtime make chooses",
    "slurm-train": "sbatch runs the checkout's env/slurm/train.sbatch on every node",
    "slurm-nccl-test": "sbatch runs the checkout's env/slurm/nccl-test.sbatch on every node",
    "test": "the tests live in the checkout",
    "test-current": "the tests live in the checkout",
    "test-image": "the image is built and tested from the checkout",
    "test-slurm": "the Slurm cluster test runs from the checkout",
    "lint": "lint checks the checkout's files",
    "lock": "the locks are the checkout's files",
    "clean": "it cleans the checkout",
}
KIND_HELP = {
    "count": "a whole number",
    "real": "a decimal number",
    "text": "text",
    "switch": "a switch",
}
OVERRIDES = "ARGS"


def flag(name: str) -> str:
    """A make variable's flag here: GPUS -> --gpus, RUN_DIR -> --run-dir."""
    return "--" + name.lower().replace("_", "-")


def label(name: str) -> str:
    """How a make variable is named to the user of this console: by its flag, or as a positional argument."""
    return "a key=value override" if name == OVERRIDES else flag(name) if MAKE_VARS[name].flag else name


def _variable_help(name: str) -> str:
    var = MAKE_VARS[name]
    sets = f"; sets {var.config_key}" if var.config_key else ""
    return f"{KIND_HELP[var.kind]}{sets} (make {name}{'=1' if var.kind == 'switch' else ''})"


def target_parser(name: str, target: Target) -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"torchrig {name}", description=f"{target.summary} (python -m {target.module})", allow_abbrev=False
    )
    for var in target.variables:
        if MAKE_VARS[var].kind == "switch":
            parser.add_argument(flag(var), dest=var, action="store_const", const="1", help=_variable_help(var))
        else:
            parser.add_argument(flag(var), dest=var, metavar=var, help=_variable_help(var))
    for var in target.positional:
        if var == OVERRIDES:
            parser.add_argument(var, nargs="*", metavar="key=value", help="config overrides (make ARGS)")
        else:
            parser.add_argument(var, metavar=var, help=f"text (make {var})")
    return parser


def overview() -> str:
    width = max(map(len, TARGETS))
    lines = ["usage: torchrig TARGET [--variable value ...] [key=value ...]", "", "targets (make's, run here):"]
    lines += [f"  {name:<{width}}  {target.summary}" for name, target in TARGETS.items()]
    lines += ["", f"make only: {', '.join(MAKE_ONLY)}", "`torchrig TARGET --help` lists a target's variables."]
    return "\n".join(lines)


def parse(name: str, argv: Sequence[str]) -> dict[str, str]:
    """The make variables a subcommand's arguments give, as make would hand them over: NAME -> text."""
    target = TARGETS[name]
    parsed = vars(target_parser(name, target).parse_intermixed_args(list(argv)))
    values = {var: value for var, value in parsed.items() if value is not None and var != OVERRIDES}
    words = parsed.get(OVERRIDES) or []
    wrong = [word for word in words if not is_override(word)]
    if wrong:
        raise UserError(
            f"'{wrong[0]}' is not a key=value config override (e.g. train.lr=3e-4); "
            f"`torchrig {name} --help` lists the flags"
        )
    if words:
        values[OVERRIDES] = shlex.join(words)
    return values


def command(name: str, argv: Sequence[str]) -> list[str]:
    """The target's CLI as this Python runs it, after every check make's dispatcher makes."""
    values = parse(name, argv)
    check_values(name, values, label)
    target = TARGETS[name]
    visible = visible_gpu_count() if "GPUS" in target.variables else 0
    return [sys.executable, *job_argv(target, values, visible, label)[1:]]


def dispatch(argv: Sequence[str]) -> int:
    name, rest = argv[0], argv[1:]
    cli = command(name, rest)
    # As RUNTIME=local: the environment's own executables first on PATH (torchrun's workers, tools the CLIs start).
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.execve(sys.executable, cli, env)
    return 0  # not reached: the target's CLI replaced this process


def _unknown(word: str) -> UserError:
    if word in MAKE_ONLY:
        return UserError(f"{word} is a make target only ({MAKE_ONLY[word]}); run `make {word}` in a torchrig checkout")
    close = difflib.get_close_matches(word, [*TARGETS, *MAKE_ONLY], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return UserError(f"'{word}' is not a torchrig target; {hint}`torchrig --help` lists them")


def _run(args: Sequence[str]) -> int:
    if args and args[0] in ("-h", "--help", "help"):
        print(overview(), flush=True)
        return 0
    if not args:
        raise UserError("give a target, e.g. torchrig train; `torchrig --help` lists them")
    if args[0] not in TARGETS:
        raise _unknown(args[0])
    return dispatch(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: `torchrig --help` (or help), or `torchrig TARGET ...`, which returns only when refused."""
    args = list(sys.argv[1:] if argv is None else argv)
    return exit_code(args[0] if args and args[0] in TARGETS else "console", _run, args)


if __name__ == "__main__":
    sys.exit(main())
