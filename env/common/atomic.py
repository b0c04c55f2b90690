"""Files that are either the old version or the new one, never half of one, even after a crash.

Every temporary file or folder is created exclusively under a random name beside its target
(O_CREAT|O_EXCL|O_NOFOLLOW; mkdir for a folder), so a symlink planted at a guessable name can
never redirect a write: the create fails on it and another name is drawn. A target that is
itself a symlink is replaced, not written through: rename(2) swaps the link for the new file and
leaves whatever it pointed at untouched.
"""

from __future__ import annotations

import errno
import os
import secrets
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
TEMP_PREFIX = ".tmp-"  # every temporary name starts so: a cleanup can find what a crash left
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_ATTEMPTS = 100


def write_fix(error: OSError) -> str:
    """What to do about a failed write, e.g. 'free space or set RUN_DIR elsewhere' for ENOSPC."""
    return WRITE_FIXES.get(error.errno, DEFAULT_WRITE_FIX)


def _temp_name(folder: Path, stem: str) -> Path:
    # 64 random bits: unique even across hosts sharing the folder (multi-node ranks writing one file).
    return folder / f"{TEMP_PREFIX}{stem}.{secrets.token_hex(8)}"


def open_exclusive(path: Path, mode: str = "wb") -> IO[Any]:
    """`path` created anew and opened for writing; FileExistsError if anything, a link included, is there."""
    return os.fdopen(os.open(path, _EXCLUSIVE, 0o666), mode)  # the umask applies, as for any new file


def create_exclusive(folder: Path, stem: str, mode: str = "wb") -> tuple[Path, IO[Any]]:
    """A new file in `folder` under a fresh random name, opened for writing; never an existing file or link."""
    for _ in range(_ATTEMPTS):
        path = _temp_name(folder, stem)
        try:
            return path, open_exclusive(path, mode)
        except FileExistsError:  # a name taken (by a planted link, say): draw another
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {folder}")


def make_temp_dir(folder: Path, stem: str) -> Path:
    """A new, empty folder in `folder` under a fresh random name (mkdir never follows a link)."""
    for _ in range(_ATTEMPTS):
        path = _temp_name(folder, stem)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {folder}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Write through an exclusive temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    A `path` that is a symlink is replaced by the new file; its target is never opened.
    """
    tmp, handle = create_exclusive(path.parent, path.name, mode)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda handle: handle.write(text))
