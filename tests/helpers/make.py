"""make as a user runs it: tests skip where make is missing, and never run as a make nested in `make test`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers.paths import ROOT

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (the image leaves it out)")
# What make's targets run is .venv's python, the pinned torch, even under make test-current's newest torch: that
# suite leaves these tests out (-m "not pinned_venv"), make test runs them.
pinned_venv = pytest.mark.pinned_venv


def user_environment() -> dict[str, str]:
    """This environment without what a `make test` around the suite passes down (MAKEFLAGS, and make[1] names)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def make(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, silent: bool = True
) -> subprocess.CompletedProcess:
    """`make args RUNTIME=local` from the repository root, a user's own make; silent: -s, else --no-print-directory."""
    return subprocess.run(
        ["make", "-s" if silent else "--no-print-directory", *args, "RUNTIME=local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**user_environment(), **(env or {})},
    )
