"""Benchmarks that print figures (no pass/fail on speed): `python -m train.benchmarks.<name> --help`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def benchmark_main(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], None],
    argv: list[str] | None,
) -> int:
    """A benchmark's CLI: a config or data mistake is one line and exit 2."""
    from train.config import ConfigError
    from train.data import DataError

    try:
        run(parse_args(argv))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
