"""The hang watchdog on its own, in a child process (it ends its process with os._exit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers.paths import ROOT

CHILD = textwrap.dedent(
    """
    import time
    from train.watchdog import Watchdog

    class GoneStore:  # the store's host (rank 0) has died: every call fails
        def set(self, key, value):
            raise RuntimeError("Connection reset by peer")
        check = get = set

    Watchdog(GoneStore(), rank=1, world_size=2, first_timeout_s=1.0, timeout_s=1.0,
             last_checkpoint=lambda: "the last checkpoint is step 4").start()
    time.sleep(20)
    print("watchdog never fired")
    """
)


def test_a_lost_store_does_not_silence_the_hang_timeout() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 2, child.stdout + child.stderr
    assert child.stderr.startswith("torchrig: rank 1 lost the rendezvous store")
    assert "no progress for 1 s, so the job ends now. the last checkpoint is step 4." in child.stderr
