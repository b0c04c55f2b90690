"""The one error of the checkpoint package."""

from __future__ import annotations

from env.cli import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read or used; the message is one line with the fix."""
