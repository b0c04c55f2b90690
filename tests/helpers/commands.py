"""The project's commands run from the repository root, as a user runs them, and their one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.paths import ROOT


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` in this interpreter."""
    return run([sys.executable, "-m", module, *args])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one `torchrig…` line of a command refused as a user error (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("torchrig")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]
