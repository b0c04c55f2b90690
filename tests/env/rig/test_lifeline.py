"""env/rig/lifeline.py: a worker ends with its launcher, and the docker client with its dispatcher, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.processes import alive, wait_for

pytestmark = pytest.mark.slow


def _ends_with_killed_parent(parent_code: str) -> bool:
    """Run parent_code (which starts a child and prints its pid), SIGKILL it, and say whether the child ended."""
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(ROOT)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait()
        return wait_for(lambda: not alive(child), 60)  # generous: that it ends, not how fast
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


def test_a_worker_ends_when_its_parent_is_killed() -> None:
    # parent -> child in a session of its own, as torchrun starts workers; the child asks to end with
    # its parent, says so, and sleeps.
    child_code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from env.rig.lifeline import end_with_parent;"
        "end_with_parent(); print('ready', flush=True); time.sleep(600)"
    )
    parent_code = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],"
        " start_new_session=True); print(p.pid, flush=True); time.sleep(600)"
    )
    assert _ends_with_killed_parent(parent_code.replace("sys.argv[1], sys.argv[2]", f"{child_code!r}, sys.argv[1]"))


def test_end_with_parent_ends_at_once_when_the_parent_is_already_gone() -> None:
    # The launcher died before the worker asked for the signal: its parent is no longer the expected one.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from env.rig.lifeline import end_with_parent; end_with_parent(1)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_the_docker_client_gets_sigterm_when_the_dispatcher_is_killed() -> None:
    # As env/rig/docker.py starts `docker compose run`: here a stand-in client (sleep) under a stand-in dispatcher.
    parent_code = (
        "import subprocess, sys, time; sys.path.insert(0, sys.argv[1]);"
        "from env.rig.lifeline import signal_when_parent_dies;"
        "p = subprocess.Popen(['sleep', '600'], preexec_fn=signal_when_parent_dies()); print(p.pid, flush=True);"
        "print('ready', flush=True); time.sleep(600)"
    )
    assert _ends_with_killed_parent(parent_code), "the client outlived the dispatcher"
