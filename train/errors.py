"""The configuration error every layer of train/ raises, and the one at-least-1 check.

It sits under everything in train/ except the schema (config.py imports nothing of ours), so that the
model families, the data and the loader all raise the same error without importing each other.
"""

from __future__ import annotations

from env.common.cli import UserError


class ConfigError(UserError):
    """A user-caused configuration problem; its message is one line with the fix."""


def require_positive(values: dict[str, int]) -> None:
    """A ConfigError for the first key whose value is below 1 (keys as the user writes them, e.g. "train.steps")."""
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")


class DataError(UserError):
    """A user-caused data problem; its message is one line naming the problem and the fix."""
