"""Process groups of a test's own over gloo: a free port for the rendezvous, and a worker's clean exit."""

from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist


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
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
