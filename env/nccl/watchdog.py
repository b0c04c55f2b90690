"""The deadline on nccl-test's first peer copy and first collective: one FAIL line instead of a long hang."""

from __future__ import annotations

import os
import sys
import threading

QUIET_RANKS_GRACE_S = 5  # ranks other than local rank 0 give up this much later, so that rank 0 explains
PG_TIMEOUT_MARGIN_S = 30  # the process group's own timeout runs this much behind our watchdog's
HANG_HINT = (
    "usual causes: P2P on GeForce cards (retry with NCCL_P2P_DISABLE=1), ACS or the IOMMU blocking P2P"
    " (disable ACS in the BIOS, or boot with iommu=pt), a too-small /dev/shm (docker --shm-size=16g or --ipc=host),"
    " and across nodes a firewall or the wrong interface (open the ports, set NCCL_SOCKET_IFNAME)"
)


class CollectiveWatchdog:
    """Ends the process with one FAIL line if a step that takes seconds when healthy has not finished in time.

    A hung NCCL communicator or peer copy (the classic: P2P on GeForce cards) otherwise sits until
    the process group's timeout, many minutes later, and then prints pages of traceback, or forever.
    """

    def __init__(self, timeout_s: float, message: str, announce: bool) -> None:
        self.timeout_s = timeout_s
        self.message = message
        self.announce = announce
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> CollectiveWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        if self.announce:
            print(self.message, flush=True)
        sys.stderr.flush()
        os._exit(1)
