"""Reading back a file of the project that a user may have replaced: only a regular file, bounded.

A run's records (summary.json, manifest.json, metrics.jsonl) are read again by later launches. A
link to /dev/zero or a multi-gigabyte file planted at such a name must not hang or exhaust the
reader: anything that is not a regular file, or is larger than the caller's bound, reads as absent.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: Path, limit: int) -> BinaryIO | None:
    """The file opened for reading when it is a regular file of at most `limit` bytes, else None."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError:
        return None
    info = os.fstat(handle.fileno())  # of what was opened: no window for a swap after a stat of the name
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        handle.close()
        return None
    return handle


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes; None when absent, unreadable, special or larger."""
    handle = open_regular(path, limit)
    if handle is None:
        return None
    with handle:
        try:
            return handle.read(limit + 1)[:limit]
        except OSError:
            return None
