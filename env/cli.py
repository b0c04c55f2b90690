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
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UserError(Exception):
    """A problem the user caused and can fix; the message is one line that says how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose misuse is a UserError (one line) rather than a usage text and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; `{self.prog} --help` lists the arguments")


def one_line(text: str) -> str:
    """A message folded onto one line, so a newline in a user's value cannot forge output lines."""
    return " ".join(str(text).split())


def run_cli(tool: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit with its code; a UserError is `torchrig <tool>: <line>`, exit 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"torchrig {tool}: {one_line(str(exc))}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
