"""What a user types at the make command line: bad input is one line and a non-zero exit."""

from __future__ import annotations

import pytest

from tests.helpers.commands import run
from tests.helpers.make import needs_make


@needs_make
def test_make_help_lists_every_target_once() -> None:
    out = run(["make", "help"]).stdout
    targets = [
        "help",
        "setup",
        "build",
        "doctor",
        "nccl-test",
        "train",
        "bench",
        "shell",
        "test",
        "test-image",
        "lint",
        "clean",
        "compare",
    ]
    for target in targets:
        assert sum(line.split()[1] == target for line in out.splitlines()) == 1, target


@needs_make
@pytest.mark.parametrize("gpus", ["0", "abc", "-1", "99"])
def test_make_train_rejects_bad_gpus_at_once(gpus: str) -> None:
    result = run(["make", "train", f"GPUS={gpus}", "RUNTIME=local"])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("torchrig make: GPUS")]
    assert len(ours) == 1 and "Traceback" not in result.stderr
