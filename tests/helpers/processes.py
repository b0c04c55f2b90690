"""Processes as /proc shows them: a run's launcher or worker, whether one is alive, its children; waiting."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            if int(ppid) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """pid is a process that has not ended (a zombie has)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def wait_for(condition, timeout: float) -> bool:
    """Whether condition() held within timeout seconds, asked every half second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def pid_of(module: str, run_dir: Path, rank: int | None = None) -> int:
    """The process running `python -m module` for the run in run_dir (its worker of `rank`, if given)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = module.encode() in args and any(arg.endswith(bytes(run_dir)) for arg in args)
        if ours and (rank is None or f"RANK={rank}".encode() in environ):
            return int(entry.name)
    raise AssertionError(f"no {module} process of {run_dir}" + ("" if rank is None else f" with rank {rank}"))


@contextlib.contextmanager
def alarm_after(seconds: int, why: str) -> Iterator[None]:
    """Fail with TimeoutError(why) once `seconds` pass: a hang (a blocking read, an endless walk) ends the test
    instead of the suite. The main thread only (SIGALRM)."""

    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(why)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
