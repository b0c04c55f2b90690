"""env.common.cli's checks that every entry point shares: the GPU count against the visible GPUs."""

from __future__ import annotations

import pytest

from env.common.cli import CPU_DEFAULT_WORKERS, UserError, check_workers


def test_gpus_validation_against_visible_gpus() -> None:
    assert check_workers(2, 3) == 2
    assert check_workers(8, 0) == 8
    assert check_workers(None, 3) == 3 and check_workers(None, 0) == CPU_DEFAULT_WORKERS  # the one CPU default
    with pytest.raises(UserError, match="only 3"):
        check_workers(4, 3)
    with pytest.raises(UserError, match="at most 8"):
        check_workers(9, 0)
