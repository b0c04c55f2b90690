"""One job at a time in a run directory: an flock on RUN_DIR/.lock that names its holder.

Training and the collective test take it in their launcher before any worker starts (node 0 on a
multi-node job: RUN_DIR is shared storage, and the other nodes can only join node 0's rendezvous).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from env.common.cli import UserError

LOCK_NAME = ".lock"


class RunDirBusy(UserError):
    """Another job holds the run directory's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the holder wrote into the lock file."""

    pid: int
    host: str
    since: str

    @classmethod
    def read(cls, fd: int) -> Holder | None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            data = json.loads(os.read(fd, 4096).decode())
            return cls(int(data["pid"]), str(data["host"]), str(data["since"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # being written right now, or not ours: the flock alone decides

    def is_dead_here(self) -> bool:
        """True when this host is the holder's and no process has its pid (a lock the kernel failed to drop)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False


class RunDirLock:
    """An exclusive flock on RUN_DIR/.lock, held for the life of the process that took it.

    The kernel drops a flock when its holder dies, however it dies, so a killed job never blocks a
    rerun. Where the file system keeps a dead holder's lock (some network file systems hold it until
    a lease runs out), a lock whose holder wrote this host and a pid that no longer exists is stale:
    the file is replaced and the new one locked. The holder writes its pid, host and start time into
    the file, so that a refused job can name the running one.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        for _ in range(10):  # each round follows a replaced file; two rounds are the most a race needs
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = Holder.read(fd)
                if holder is None or not holder.is_dead_here():
                    os.close(fd)
                    raise RunDirBusy(self._busy_message(holder)) from None
                # A stale lock of a dead job: take the name over with a fresh file.
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                os.close(fd)
                continue
            if not self._still_named(fd):  # replaced between our open and our flock: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            self._write_holder()
            return self
        raise RunDirBusy(f"{self.path} keeps being replaced by another job; make sure one job uses RUN_DIR")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, unlocked, for the next job
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _open(self) -> int:
        # O_NOFOLLOW: a link planted at the lock's name is refused, never written through.
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_holder(self) -> None:
        assert self._fd is not None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    def _busy_message(self, holder: Holder | None) -> str:
        who = f"pid {holder.pid} on host {holder.host}, since {holder.since}" if holder else "a job starting now"
        return (
            f"RUN_DIR {self.path.parent} is in use by a running job ({who}); "
            "wait for it to finish or stop it, or choose another RUN_DIR"
        )
