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
import contextlib
import errno
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

from env.common.cli import UserError, count_arg
from env.rig.lifeline import PARENT_ENV

# Exit code a worker uses after printing a one-line, user-caused error: nothing to add.
USER_ERROR_EXIT = 2
# How long a multi-node rank waits for the others (a node rank > 0 for the master to answer, node
# rank 0 for every node to join) before it gives up in one line: MASTER_WAIT, in seconds.
DEFAULT_MASTER_WAIT_S = 300
ELASTIC_LOGGER = "torch.distributed.elastic"


@dataclass(frozen=True)
class Nodes:
    """This node's place in the job, as torchrun's --nnodes, --node-rank, --master-addr/--master-port flags."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 29500
    max_restarts: int = 0  # times the whole group is restarted after a failure
    master_wait_s: int = DEFAULT_MASTER_WAIT_S  # see DEFAULT_MASTER_WAIT_S

    def problem(self) -> str | None:
        """What is wrong with these flags, in one line naming the flag, or None."""
        bounds = (
            ("--nnodes", self.nnodes, 1, None),
            ("--node-rank", self.node_rank, 0, self.nnodes - 1),
            ("--master-port", self.master_port, 1, 65535),
            ("--max-restarts", self.max_restarts, 0, None),
            ("--master-wait", self.master_wait_s, 1, None),
        )
        for flag, value, low, high in bounds:
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                return f"{flag} {value} must be {bound}"
        if self.nnodes > 1 and not self.master_addr:
            return "--nnodes > 1 needs --master-addr (the address of node rank 0)"
        return None


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=count_arg("--nnodes"), default=1)
    parser.add_argument("--node-rank", type=count_arg("--node-rank"), default=0)
    parser.add_argument("--master-addr", default="")
    parser.add_argument("--master-port", type=count_arg("--master-port"), default=29500)
    parser.add_argument(
        "--max-restarts",
        type=count_arg("--max-restarts"),
        default=0,
        help="restart the group this often after a failure",
    )
    parser.add_argument(
        "--master-wait",
        type=count_arg("--master-wait"),
        default=DEFAULT_MASTER_WAIT_S,
        help=f"seconds to wait for the other nodes (default {DEFAULT_MASTER_WAIT_S})",
    )


def nodes_from_args(args: argparse.Namespace) -> Nodes:
    """The flags add_node_arguments added, unchecked: see Nodes.problem."""
    return Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port, args.max_restarts, args.master_wait)


def check_rendezvous(nodes: Nodes) -> None:
    """Before any worker starts: node rank 0 can take MASTER_PORT; any other node reaches the master in time.

    Without this a bound port is torchrun's 46-line traceback and an absent master a silent wait.
    """
    if nodes.nnodes < 2:
        return
    where = f"{nodes.master_addr}:{nodes.master_port}"
    if nodes.node_rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", nodes.master_port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise UserError(
                    f"MASTER_PORT {nodes.master_port} is already in use on this host (another job?); "
                    "choose a free MASTER_PORT, the same on every node"
                ) from None
        print(
            f"torchrig: node 0 of {nodes.nnodes}: waiting up to {nodes.master_wait_s} s at {where} for the other "
            "nodes (MASTER_WAIT)",
            file=sys.stderr,
            flush=True,
        )
        return
    print(
        f"torchrig: node {nodes.node_rank} of {nodes.nnodes}: waiting up to {nodes.master_wait_s} s for the master "
        f"(NODE_RANK=0) at {where} (MASTER_WAIT)",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + nodes.master_wait_s
    while True:
        try:
            with socket.create_connection((nodes.master_addr, nodes.master_port), timeout=5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"no master answered at {where} within {nodes.master_wait_s} s; start NODE_RANK=0 there first "
                    "(same MASTER_ADDR and MASTER_PORT), check the address and firewall, or raise MASTER_WAIT"
                ) from None
            time.sleep(1)


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

    # The agent logs each worker failure at ERROR level with a traceback, and each signal; we report them
    # ourselves. torch sets a level on each of its module loggers, so the parent's level alone is not enough.
    for name in [ELASTIC_LOGGER, *logging.root.manager.loggerDict]:
        if name == ELASTIC_LOGGER or name.startswith(ELASTIC_LOGGER + "."):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", _threads_per_worker(nproc))
    # The agent runs in this process and is the workers' parent: they end when it dies (env/rig/lifeline.py).
    os.environ[PARENT_ENV] = str(os.getpid())
    if nodes.nnodes > 1:
        endpoint = f"{nodes.master_addr}:{nodes.master_port}"
        rdzv = {
            "rdzv_backend": "static",
            "rdzv_endpoint": endpoint,
            "rdzv_configs": {"rank": nodes.node_rank, "timeout": nodes.master_wait_s},
        }
        if os.environ.get("PET_RDZV_BACKEND") == "c10d":  # torchrun's variable; env/slurm/ sets it
            # c10d: the nodes meet in a store on the first node and are ranked as they join, under one run id.
            rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": endpoint, "rdzv_configs": {"timeout": nodes.master_wait_s}}
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
        with _one_stop_per_signal():
            elastic_launch(config, entrypoint=sys.executable)("-u", "-m", module, *worker_argv(args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the earliest failure is the cause; later ones follow from it
        if failure.exitcode not in explained:
            print(f"torchrig: {failure_line(rank, failure.exitcode, failure.signal_name())}", file=sys.stderr)
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


def worker_argv(args: Sequence[str]) -> list[str]:
    """`args` as they must be handed to torch elastic's agent for every worker to receive them byte for byte.

    The agent passes each argument through string.Template.safe_substitute(local_rank=...) (its macros),
    so RUN_DIR='runs/d$$e' would reach the workers as 'runs/d$e' and 'x${local_rank}y' as 'x0y'. Each
    '$' is doubled, which the substitution turns back into one; checked against the installed torch's
    own substitution, so a torch that stops substituting gets the arguments as they are.
    """
    try:
        from torch.distributed.elastic.utils.api import macros
    except ImportError:
        return list(args)
    handed = []
    for arg in args:
        escaped = arg.replace("$", "$$")
        for candidate in (escaped, arg):
            if macros.substitute([candidate], "0")[0] == arg and macros.substitute([candidate], "1")[0] == arg:
                handed.append(candidate)
                break
        else:
            raise UserError(f"the argument {arg!r} cannot reach the workers unchanged; avoid '$' in it")
    return handed


@contextlib.contextmanager
def _one_stop_per_signal() -> Iterator[None]:
    """The agent's signal handler raises on the first SIGTERM/SIGINT and ignores the ones after it.

    torch's handler raises SignalException on every signal. A second one lands while the agent is
    shutting down, often inside a logging call: that leaves logging's lock held and the agent waits
    forever for its keep-alive thread, which wants that lock. A second signal is the rule, not a
    corner: GNU make passes a SIGTERM on to its child, which the process group's SIGTERM already
    reached. The agent's shutdown is bounded on its own (SIGKILL to the workers after 30 s).
    """
    from torch.distributed.elastic.multiprocessing import api

    raise_signal = api._terminate_process_handler
    seen: list[int] = []

    def first_only(signum: int, frame: FrameType | None) -> None:
        if not seen:
            seen.append(signum)
            raise_signal(signum, frame)

    api._terminate_process_handler = first_only  # looked up when the agent starts its workers
    try:
        yield
    finally:
        api._terminate_process_handler = raise_signal


def failure_line(rank: int, exitcode: int, signal_name: str) -> str:
    """What a failed worker's exit says: a signal leaves no output of its own, so the line must say where to look."""
    if exitcode >= 0:
        return f"worker rank {rank} failed (exit code {exitcode}); its traceback above says why"
    if signal_name == "SIGKILL":
        return (
            f"worker rank {rank} was killed by signal 9 (SIGKILL) and could print nothing: most often the kernel's "
            "out-of-memory killer (see `dmesg` or `journalctl -k`; lower MICRO_BATCH or GPUS), else someone ran kill -9"
        )
    return (
        f"worker rank {rank} was killed by signal {-exitcode} ({signal_name}) and could print nothing; "
        "see `dmesg` or `journalctl -k` for who sent it"
    )
