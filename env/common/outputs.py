"""Owning an output while it is written: one writer at a time, published in one step, no leftovers.

What goes wrong without it: two writers into one output both exit 0 and one result is lost, or
one's weights end up beside the other's config; a writer killed with SIGKILL leaves its temporary
files (`.tmp-x.bin.<hex>`, env.common.atomic's names) that no rerun removes; a forced rewrite
removes files it never wrote without saying so. Every writer of a named output (make export's
directory, make prepare's token file, make eval's eval.json) therefore:

1. holds `OutputLock(target)` for the whole write: an flock on a hidden file beside the target
   (`.<name>.lock`), never waited for: a second writer is refused in one line that names the first.
   The kernel drops an flock when its holder dies, however it dies; the file is removed on release;
2. under the lock, calls `remove_leftovers(folder, names)`: any temporary of those names is a dead
   writer's (a live one would hold the lock), so it is removed;
3. publishes in one step: a file through env.common.atomic (write beside, rename over), a directory
   through `stage_dir` + `publish_dir` (build it beside, then swap it in with one rename, so a
   reader sees the old directory or the new one, never a mix), naming what it replaced.

Files copied into an output (a tokenizer.json) are read with env.common.readfile's
`read_bounded(..., follow=False)`: a regular file, never a symlink, never a FIFO or device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from env.common.atomic import TEMP_PREFIX, fsync_dir, make_temp_dir
from env.common.cli import UserError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names atomically


class OutputBusy(UserError):
    """Another process is writing the same output."""


def lock_path(target: Path) -> Path:
    """Where the lock of `target` lives: a hidden file beside it (the target itself may not exist yet)."""
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """An exclusive, non-blocking flock that owns `target` for a write; `what` names it in the refusal (OUTPUT)."""

    def __init__(self, target: Path, what: str = "the output") -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        for _ in range(10):  # each round follows a lock file removed by its releasing holder
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputBusy(
                    f"{self.what} {self.target} is being written by another process ({holder}); "
                    f"wait for it to finish, or choose another {self.what}"
                ) from None
            if not _still_named(fd, self.path):  # released and removed between our open and our flock
                os.close(fd)
                continue
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise OutputBusy(f"the lock {self.path} keeps being replaced; make sure one process writes {self.target}")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiter that opened it retries on the name
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(data['pid'])} on host {data['host']}, since {data['since']}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "one starting now"


def _still_named(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def leftover_pattern(name: str) -> re.Pattern[str]:
    """The temporary names env.common.atomic draws for a target called `name`: `.tmp-<name>.<16 hex>`."""
    return re.compile(rf"{re.escape(TEMP_PREFIX + name)}\.[0-9a-f]{{16}}")


def remove_leftovers(folder: Path, names: Collection[str]) -> list[str]:
    """Remove the temporaries of `names` in `folder` that a killed writer left; call it holding their OutputLock.

    Only env.common.atomic's exact names for these targets are touched (files, links or folders), never
    anything else. Returns the names removed.
    """
    patterns = [leftover_pattern(name) for name in names]
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if any(p.fullmatch(entry.name) for p in patterns):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def stage_dir(target: Path) -> Path:
    """A new, empty folder beside `target` to build it in (a temporary name remove_leftovers knows)."""
    return make_temp_dir(target.parent, target.name)


@dataclass
class Published:
    """What publish_dir did to the directory that was there: entries replaced, removed, and kept (carried over)."""

    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def publish_dir(staging: Path, target: Path, keep: Callable[[str], bool] = lambda name: False) -> Published:
    """Put the finished folder `staging` at `target` in one step; call it holding target's OutputLock.

    A missing target is created by one rename. An existing one (a forced rewrite) is swapped with the
    staging folder in one rename (Linux renameat2 RENAME_EXCHANGE; two renames where the file system
    lacks it: the target is then briefly absent, never mixed): first its entries for which keep(name)
    is true are moved into the staging folder (files the writer does not own, kept as they are),
    then the old folder, holding only what was replaced or removed, is deleted. Says which was which.
    """
    published = Published()
    fsync_dir(staging)
    if not os.path.lexists(target):
        os.rename(staging, target)
        fsync_dir(target.parent)
        return published
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a directory", str(target))
    staged = {entry.name for entry in os.scandir(staging)}
    for entry in sorted(os.scandir(target), key=lambda e: e.name):
        if entry.name in staged:
            published.replaced.append(entry.name)
        elif keep(entry.name):
            os.rename(entry.path, staging / entry.name)
            published.kept.append(entry.name)
        else:
            published.removed.append(entry.name)
    try:
        if _exchange(staging, target):
            old = staging  # after the swap the staging name holds the old folder
        else:
            old = make_temp_dir(target.parent, target.name)
            os.rename(target, old / "old")
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old / "old", target)
                os.rmdir(old)
                raise
    except OSError:
        for name in published.kept:  # nothing was swapped: the kept entries go back where they were
            with contextlib.suppress(OSError):
                os.rename(staging / name, target / name)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return published


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one rename (Linux renameat2); False where the call or the file system has no such swap."""
    libc_name = ctypes.util.find_library("c")
    try:
        renameat2 = ctypes.CDLL(libc_name or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
