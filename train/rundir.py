"""A run directory across launches: one job at a time, whether it is finished, and its history.

A RUN_DIR outlives the launch that made it: a run is resumed, stopped, resumed again. This module
holds what the launcher decides about a RUN_DIR before any worker starts (is another job using it?
is it already complete?), and the history a resumed run reads back so that summary.json covers the
whole run, not only its last segment. The history is metrics.jsonl itself: no state is added to
the checkpoints.
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
from typing import Any

from env.cli import UserError

LOCK_NAME = ".lock"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"


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


# ---------------------------------------------------------------------------------------------
# Whether a run is finished, and what it logged before a resume


def completed_steps(run_dir: Path, steps: int) -> int | None:
    """The step a finished run reached, when its summary says it ran to `steps` or beyond; else None.

    A run that stopped early (SIGTERM), crashed (no summary yet) or is asked for more steps is not
    complete; a summary that cannot be read is not evidence that it is.
    """
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("stopped_early") is not False:
        return None
    reached = summary.get("steps")
    if isinstance(reached, int) and not isinstance(reached, bool) and reached >= steps:
        return reached
    return None


def earlier_records(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows metrics.jsonl holds for steps 1..up_to_step, the newest row of each step, in step order.

    A resumed run's checkpoint is at up_to_step: rows past it come from a segment that was lost and
    is trained again, and a row cut short by a kill is skipped.
    """
    if up_to_step <= 0:
        return []
    by_step: dict[int, dict[str, Any]] = {}
    try:
        with open(Path(run_dir) / METRICS_NAME, encoding="utf-8", errors="replace") as rows:
            for line in rows:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                step = record.get("step") if isinstance(record, dict) else None
                if isinstance(step, int) and 0 < step <= up_to_step and isinstance(record.get("loss"), (int, float)):
                    by_step[step] = record
    except OSError:
        return []
    return [by_step[step] for step in sorted(by_step)]
