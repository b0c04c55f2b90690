"""Shared test setup: the repository root on sys.path, and a marker for tests that need CUDA."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run env/gpu_check.sh on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A loopback port free now, for a test's own process group or rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def finish_gloo_worker() -> None:
    """End a spawned gloo test worker that succeeded: wait for the others, then exit without teardown.

    On torch 2.4, destroying a gloo process group (or the DDP reducer holding it) after a peer has
    gone can block forever in a C++ destructor; train/worker.py leaves the same way.
    """
    import os

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
