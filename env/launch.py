"""Start one worker process per GPU (or per CPU slot) through torchrun's elastic launcher.

This is torchrun (`torch.distributed.run`) as a library call, so that the rig can turn a
failed worker into one line instead of torchrun's ChildFailedError report, and so that a
SIGTERM to the launcher is visible to the caller (preemption). Single-node runs use a
c10d rendezvous on a free port (torchrun --standalone), so a busy port 29500 never
blocks a run; multi-node runs use a static rendezvous at MASTER_ADDR:MASTER_PORT with
NODE_RANK, as torchrun does when given --node-rank, or torchrun's c10d rendezvous there when
PET_RDZV_BACKEND=c10d (as env/slurm/ sets it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from env.lifeline import PARENT_ENV

# Exit code a worker uses after printing a one-line, user-caused error: nothing to add.
USER_ERROR_EXIT = 2


@dataclass(frozen=True)
class Nodes:
    """This node's place in the job, as torchrun's --nnodes, --node-rank, --master-addr/--master-port flags."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 29500
    max_restarts: int = 0  # times the whole group is restarted after a failure

    def problem(self) -> str | None:
        """What is wrong with these flags, in one line naming the flag, or None."""
        bounds = (
            ("--nnodes", self.nnodes, 1, None),
            ("--node-rank", self.node_rank, 0, self.nnodes - 1),
            ("--master-port", self.master_port, 1, 65535),
            ("--max-restarts", self.max_restarts, 0, None),
        )
        for flag, value, low, high in bounds:
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                return f"{flag} {value} must be {bound}"
        if self.nnodes > 1 and not self.master_addr:
            return "--nnodes > 1 needs --master-addr (the address of node rank 0)"
        return None


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--max-restarts", type=int, default=0, help="restart the group this often after a failure")


def nodes_from_args(args: argparse.Namespace) -> Nodes:
    """The flags add_node_arguments added, unchecked: see Nodes.problem."""
    return Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port, args.max_restarts)


def _threads_per_worker(nproc: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return str(max(1, cores // max(1, nproc)))


def launch(
    module: str,
    args: Sequence[str],
    nproc: int,
    *,
    nodes: Nodes = Nodes(),
    explained: Collection[int] = (USER_ERROR_EXIT,),
) -> int:
    """Run `python -m module *args` in `nproc` workers on this node; return an exit code.

    0 when every worker succeeded; a failed worker's exit code otherwise (one line is
    printed unless that code is in `explained`: the worker said why itself); 128+signal
    when the launcher itself was signalled (SIGTERM/SIGINT), after the workers were
    asked to stop with the same signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs each worker failure at ERROR level with a traceback; we report it ourselves.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", _threads_per_worker(nproc))
    # The agent runs in this process and is the workers' parent: they end when it dies (env/lifeline.py).
    os.environ[PARENT_ENV] = str(os.getpid())
    if nodes.nnodes > 1:
        endpoint = f"{nodes.master_addr}:{nodes.master_port}"
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": endpoint, "rdzv_configs": {"rank": nodes.node_rank}}
        if os.environ.get("PET_RDZV_BACKEND") == "c10d":  # torchrun's variable; env/slurm/ sets it
            # c10d: the nodes meet in a store on the first node and are ranked as they join, under one run id.
            rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": endpoint, "rdzv_configs": {}}
        # The rendezvous keys are prefixed with the run id, so every node of the job must use the same one.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", f"torchrig-{endpoint}")
    else:
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "rdzv_configs": {}}
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", f"torchrig-{uuid.uuid4().hex[:8]}")
    config = LaunchConfig(
        min_nodes=nodes.nnodes,
        max_nodes=nodes.nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        role="worker",
        max_restarts=nodes.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        **rdzv,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", module, *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the earliest failure is the cause; later ones follow from it
        if failure.exitcode not in explained:
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"torchrig: worker rank {rank} failed ({how}); its output above says why", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except RendezvousError as exc:
        # The node whose launcher held the c10d store ended (failed, or was killed): this one cannot go on.
        print(
            f"torchrig: lost the rendezvous with the other nodes ({type(exc).__name__}); see their output",
            file=sys.stderr,
        )
        return 1
    return 0
