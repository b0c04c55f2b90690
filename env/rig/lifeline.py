"""A worker ends when its launcher dies, however the launcher dies.

torchrun's agent runs inside our launcher (env/rig/launch.py calls it as a library) and starts each
worker with Popen in a session of its own, so a SIGKILL of the launcher reaches no worker: they
would go on training and checkpointing under PID 1 and race the rerun. Each worker therefore asks
the kernel for SIGKILL when its parent goes (Linux prctl PR_SET_PDEATHSIG), then checks that the
parent is still the launcher that started it (it may have died before the request was made).
PR_SET_PDEATHSIG fires when the thread that forked the worker ends, not the process, and other
systems have no such call, so a thread also polls the parent pid and ends the process on a change.
SIGKILL, not SIGTERM: a SIGTERM is a preemption request, which would write one more checkpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

# Set by the launcher in the workers' environment: the pid their parent must have.
PARENT_ENV = "TORCHRIG_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _request_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux for `sig` when the parent dies; False where the call does not exist."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait(POLL_S)


def end_with_parent(parent: int | None = None) -> None:
    """From now on, this process dies by SIGKILL soon after `parent` does (default: $TORCHRIG_LAUNCHER_PID,
    else the current parent). Call it first thing in a worker."""
    if parent is None:
        given = os.environ.get(PARENT_ENV, "")
        parent = int(given) if given.isdigit() else os.getppid()
    _request_death_signal()
    if os.getppid() != parent:  # the launcher died before the request above: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent,), name="lifeline", daemon=True).start()


def signal_when_parent_dies(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `sig` when this process dies, however it dies (Linux).

    For the host side of RUNTIME=docker: the compose client gets SIGTERM when the dispatcher that
    started it is killed, and passes it into the container, whose launcher stops its workers
    after a checkpoint, as on any preemption. libc is loaded here, before the fork: the child only
    makes the call.
    """
    prctl, parent = _prctl(), os.getpid()

    def request() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # died between the fork and the request
            os.kill(os.getpid(), sig)

    return request
