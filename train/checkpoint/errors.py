"""The one error of the checkpoint package."""

from __future__ import annotations

from env.common.cli import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read or used; the message is one line with the fix."""


class EveryCheckpointDamaged(CheckpointError):
    """Every committed checkpoint of a directory failed its checks (each said why in a warning line)."""

    def __init__(self, directory: str, damaged: list[str]) -> None:
        self.directory, self.damaged = directory, damaged
        super().__init__(
            f"every checkpoint in {directory} is damaged ({', '.join(damaged)}; the warnings above say how), "
            "and starting again at step 0 would train over this run's records: move them away "
            f"(mv {directory} {directory}.damaged) or use a fresh RUN_DIR"
        )
