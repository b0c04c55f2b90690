"""The one way into every `python -m …` entry point: user errors are one line and exit 2.

Every error a user can cause (a bad make variable, config key, path or file) subclasses
`UserError`. `run_cli` calls the tool's `main`, prints `torchrig <tool>: <message>` for a
UserError and exits 2, so no entry point writes its own try/except or `return 2`.
`ArgumentParser` turns argparse misuse (a missing value, a non-number, an unknown flag) into a
UserError too, instead of a usage dump. Standard library only: the dispatcher uses it before a
venv exists.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UserError(Exception):
    """A problem the user caused and can fix; the message is one line that says how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose misuse is a UserError (one line) rather than a usage text and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; `{self.prog} --help` lists the arguments")


# Without a GPU, GPUS counts CPU processes on gloo: one by default (the quick start's `make train`;
# GPUS=2 gives a collective a peer), at most MAX_CPU_PROCESSES (more only oversubscribes the cores).
CPU_DEFAULT_WORKERS = 1
MAX_CPU_PROCESSES = 8
_ASCII_COUNT = re.compile(r"[0-9]+")
# A run name becomes a directory under runs/: a plain name, never a path or an option.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def count(text: str, what: str = "the value") -> int:
    """A whole number written in ASCII digits: str.isdigit and int() also take '²', '١' or fullwidth digits."""
    if not _ASCII_COUNT.fullmatch(text):
        raise UserError(f"{what} {text!r} is not a whole number written in the digits 0-9, e.g. 2")
    return int(text)


def real(text: str, what: str = "the value") -> float:
    """A finite decimal number (nan and inf are not figures anyone means)."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{what} {text!r} is not a finite decimal number, e.g. 1.5")
    return value


def plain_name(text: str, what: str = "name") -> str:
    """A name that is one directory level: no '/', no '..', no leading dot or dash, no control character."""
    if not _PLAIN_NAME.fullmatch(text) or ".." in text:
        raise UserError(
            f"{what}={text!r} is not a plain name; use letters, digits, '_', '-', '.', '+' "
            "(not first: '.', '-'; no '/' or '..'), e.g. name=tiny-lr3"
        )
    return text


def count_arg(flag: str) -> Callable[[str], int]:
    """An argparse `type` for a whole number in ASCII digits, named by its flag in the error."""

    def parse(text: str) -> int:
        return count(text, flag)

    parse.__name__ = "whole number"
    return parse


def real_arg(flag: str) -> Callable[[str], float]:
    """An argparse `type` for a finite decimal number."""

    def parse(text: str) -> float:
        return real(text, flag)

    parse.__name__ = "finite number"
    return parse


def check_workers(requested: int | None, visible_gpus: int, flag: str = "GPUS") -> int:
    """The one GPUS check (make, the launcher, nccl-test, bench): workers on this node.

    None means the default: every visible GPU, else CPU_DEFAULT_WORKERS CPU processes on gloo.
    """
    if requested is None:
        return visible_gpus or CPU_DEFAULT_WORKERS
    given = f"{flag} {requested}" if flag.startswith("-") else f"{flag}={requested}"  # a flag, or a make variable
    if requested < 1:
        raise UserError(f"{given} must be at least 1, e.g. 2")
    if visible_gpus and requested > visible_gpus:
        raise UserError(f"{given} but only {visible_gpus} GPU(s) are visible; use {visible_gpus} or fewer")
    if not visible_gpus and requested > MAX_CPU_PROCESSES:
        raise UserError(f"{given}: no GPU is visible, so it counts CPU processes on gloo, at most {MAX_CPU_PROCESSES}")
    return requested


# The largest JSON record a user may hand a tool (a baseline, a bandwidth record, a manifest).
MAX_JSON_BYTES = 64 * 2**20


def load_json(path: object, what: str, fix: str, error: type[UserError] = UserError) -> object:
    """A JSON file a user named, parsed, or an `error` (a UserError): `{what} {path} <problem>; {fix}`.

    Read by the one bounded reader (env/common/readfile.py): refuses a missing file, a FIFO, a device
    (a link to /dev/zero), a directory, one over MAX_JSON_BYTES, one that is not UTF-8 JSON, or one
    nested deeper than readfile.MAX_JSON_DEPTH; the caller checks the shape it needs.
    """
    from pathlib import Path

    from env.common.readfile import ReadRefused, read_json

    file = Path(str(path))
    try:
        return read_json(file, MAX_JSON_BYTES)
    except ReadRefused as exc:
        raise error(f"{what} {file} {exc.reason}; {fix}") from None


def one_line(text: str) -> str:
    """A message folded onto one line, so a newline in a user's value cannot forge output lines."""
    return " ".join(str(text).split())


def exit_code(tool: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`'s exit code; a UserError is printed as `torchrig <tool>: <line>` and is 2."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"torchrig {tool}: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:  # the reader went away (`make sample | head`): nothing is wrong, nothing more to say
        _silence_stdout()
        return 0
    except OSError as exc:  # a path the user gave that the system refuses: too long, no permission, disk full
        where = f"{exc.filename}: " if exc.filename else ""
        fix = "check the path, its length and its permissions, and the free disk space"
        print(f"torchrig {tool}: {one_line(where + (exc.strerror or str(exc)))}; {fix}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush meets no closed pipe either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_cli(tool: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> NoReturn:
    """The end of every entry point: run `main(argv)` and exit with exit_code's code."""
    sys.exit(exit_code(tool, main, argv))
