"""One nccl-test process, as started by torchrun through env.nccl.launch: the per-rank measurement.

Joins the process group under a deadline (env.nccl.watchdog), runs every collective at every size
(env.nccl.collectives), and hands rank 0's rows to env.nccl.report for the verdict and the JSON record.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

from env.common.cli import UserError, run_cli
from env.machine.nvml import read_snapshot
from env.machine.p2p import P2PDecision, apply_p2p_decision, decide_p2p
from env.nccl.options import Options, parse_options, visible_cuda_gpus
from env.nccl.place import WorkerPlace
from env.nccl.report import HEADER, format_row, report, report_launch_overhead
from env.nccl.watchdog import HANG_HINT, PG_TIMEOUT_MARGIN_S, QUIET_RANKS_GRACE_S, CollectiveWatchdog
from env.rig.launch import USER_ERROR_EXIT

DECISION_ENV = "TORCHRIG_P2P_DECISION"  # the launcher's P2P decision, as JSON, handed to its workers
STALL_ENV = "TORCHRIG_TEST_STALL_RANK"  # test-only: this rank never reaches the first collective


def worker_p2p_decision(use_cuda: bool) -> P2PDecision:
    """The launcher's decision when there is one; under a bare torchrun, decide here from NVML alone."""
    handed = os.environ.get(DECISION_ENV)
    if handed:
        return P2PDecision.from_dict(json.loads(handed))
    decision = decide_p2p(read_snapshot(), os.environ, None)
    if use_cuda:
        apply_p2p_decision(decision)
    return decision


def _stall_for_test(rank: int) -> None:
    if os.environ.get(STALL_ENV) == str(rank):
        time.sleep(3600)


def start_group(place: WorkerPlace, device: Any, options: Options) -> str | None:
    """init_process_group and a first collective under the watchdog; a one-line failure, or None."""
    import torch
    import torch.distributed as dist

    from env.nccl.collectives import align_ranks

    backend = "nccl" if device.type == "cuda" else "gloo"
    announce = place.local_rank == 0
    hung = (
        f"VERDICT: FAIL - the first collective did not finish in {options.first_timeout:g} s ({backend}); {HANG_HINT}"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # Local rank 0 says why; the others give it a head start, since the first to exit gets the rest stopped.
    timeout = options.first_timeout if announce else options.first_timeout + QUIET_RANKS_GRACE_S
    with CollectiveWatchdog(timeout, hung, announce):
        _stall_for_test(place.rank)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=options.first_timeout + PG_TIMEOUT_MARGIN_S))
            align_ranks(device)
        except (RuntimeError, ValueError) as exc:  # DistBackendError, store timeouts: all RuntimeError
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"VERDICT: FAIL - the first collective failed ({backend}: {first_line}); {HANG_HINT}"
    return None


def run_worker(options: Options) -> int:
    import torch
    import torch.distributed as dist

    from env.rig.lifeline import end_with_parent

    end_with_parent()

    from env.nccl.collectives import Context

    place = WorkerPlace.from_env()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", place.local_rank) if use_cuda else torch.device("cpu")
    decision = worker_p2p_decision(use_cuda)
    failure = start_group(place, device, options)
    if failure is not None:
        if place.local_rank == 0:
            print(failure, flush=True)
        return 1
    ctx = Context(place.rank, place.world, device, options.iters, options.warmup)
    if options.launch_overhead:
        code = report_launch_overhead(ctx)
    else:
        rows = run_table(options, ctx)
        code = report(options, place, device, decision, rows) if place.rank == 0 else 0
    if use_cuda:
        dist.destroy_process_group()
        return code
    # torch 2.4's gloo teardown can deadlock: its worker thread may still need the GIL to free the
    # last collective's tensors while the destructor holds the GIL and joins that thread. Every
    # collective has finished on every rank, so a gloo worker simply leaves.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_table(options: Options, ctx: Any) -> list[Any]:
    """Every op at every size; rank 0 prints each row as it lands, then the op's nccl-tests footer."""
    from env.nccl.collectives import COLLECTIVES, element_count, measure

    rows = []
    element_size = options.dtype.torch_dtype.itemsize
    for name in options.ops:
        collective = COLLECTIVES[name]
        if ctx.rank == 0:
            print(f"# {name}: {ctx.world} rank(s), {ctx.device.type}, {options.dtype.nccl_name}", *HEADER, sep="\n")
        op_rows, counts = [], set()
        for size in options.sizes:
            count = element_count(collective, size, element_size, ctx.world)
            if count in counts:  # rounding to whole chunks made this size the same as an earlier one
                continue
            counts.add(count)
            op_rows.append(measure(collective, size, options.dtype, ctx))
            if ctx.rank == 0:
                print(format_row(op_rows[-1]), flush=True)
        if ctx.rank == 0:
            wrong = sum(row.wrong for row in op_rows)
            print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
            print(f"# Avg bus bandwidth    : {sum(r.busbw for r in op_rows) / len(op_rows):.4g}", flush=True)
        rows.extend(op_rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cuda_gpus = visible_cuda_gpus()
    try:
        options = parse_options(argv, cuda_gpus, in_worker=True)
    except UserError as exc:  # every rank meets it; rank 0 says it, and the launcher knows exit 2 needs no more
        if os.environ.get("RANK", "0") == "0":
            print(f"torchrig nccl-test: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("env.nccl.worker is one rank under torchrun; start make nccl-test (python -m env.nccl.launch)")
    return run_worker(options)


if __name__ == "__main__":
    run_cli("nccl-test", main)
