"""Files that are either the old version or the new one, never half of one, even after a crash."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# The fix to suggest when writing into a run's folder fails, by errno.
WRITE_FIXES = {
    errno.ENOSPC: "free space or set RUN_DIR elsewhere",
    errno.EDQUOT: "raise the disk quota or set RUN_DIR elsewhere",
    errno.EACCES: "make RUN_DIR writable or set RUN_DIR elsewhere",
    errno.EPERM: "make RUN_DIR writable or set RUN_DIR elsewhere",
    errno.EROFS: "set RUN_DIR to a writable file system",
}
DEFAULT_WRITE_FIX = "check RUN_DIR's storage or set RUN_DIR elsewhere"


def write_fix(error: OSError) -> str:
    """What to do about a failed write, e.g. 'free space or set RUN_DIR elsewhere' for ENOSPC."""
    return WRITE_FIXES.get(error.errno, DEFAULT_WRITE_FIX)


def replace_atomically(path: Path, write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Write through a private temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    # Unique even across hosts sharing the folder (multi-node ranks writing the same file).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda handle: handle.write(text))
