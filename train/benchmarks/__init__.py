"""Benchmarks that print figures (no pass/fail on speed): `python -m train.benchmarks.<name> --help`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def benchmark_main(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], None],
    argv: list[str] | None,
) -> int:
    """A benchmark's CLI; run it through env.common.cli.run_cli, which makes a UserError one line and exit 2."""
    run(parse_args(argv))
    return 0
