"""`make nccl-test` / `python -m env.nccl.launch [flags]`: the launcher.

Started by hand (not inside torchrun), it checks every flag first (env.nccl.options), decides P2P
from measurements (env.machine.p2p), takes the run directory's lock, writes the manifest, and starts one
worker per GPU (or per CPU process, on gloo) through env.rig.launch. Each worker (env.nccl.worker)
measures; rank 0 prints nccl-tests' table for every collective, bandwidth and version lines, a
verdict judged against what the links should give (env.machine.links), and writes a JSON record
(env.nccl.report). Exit: 0 PASS or WARN, 1 FAIL, 2 bad input. Started inside torchrun (RANK and
WORLD_SIZE set), it is the worker.
"""

from __future__ import annotations

import json
import os
import sys

from env.common.cli import run_cli
from env.machine.nvml import read_snapshot
from env.machine.p2p import apply_p2p_decision, decide_p2p, torch_copy_check
from env.nccl import worker
from env.nccl.options import Options, parse_options, visible_cuda_gpus
from env.nccl.watchdog import PG_TIMEOUT_MARGIN_S, CollectiveWatchdog
from env.rig.launch import USER_ERROR_EXIT, check_rendezvous


def launch_workers(options: Options, argv: list[str], cuda_gpus: int) -> int:
    """Decide P2P here, once, with real copies between the GPUs; then start the workers with it in their env."""
    probe_timeout = options.first_timeout + PG_TIMEOUT_MARGIN_S  # room to create a CUDA context on every GPU
    stuck = (
        f"VERDICT: FAIL - a P2P copy between GPUs did not finish in {probe_timeout:g} s;"
        " P2P is broken on this box: retry with NCCL_P2P_DISABLE=1"
    )
    with CollectiveWatchdog(probe_timeout, stuck, announce=True):
        decision = decide_p2p(read_snapshot(), os.environ, torch_copy_check if cuda_gpus > 1 else None)
    print(f"nccl-test: P2P ({decision.source}): {decision.reason}", flush=True)
    apply_p2p_decision(decision)
    os.environ[worker.DECISION_ENV] = json.dumps(decision.to_dict())
    from env.records.manifest import write_manifest
    from env.records.runlock import RunDirBusy, RunDirLock
    from env.rig.launch import launch

    if options.nodes.node_rank == 0:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        try:  # one job per RUN_DIR, held until this launcher exits (env/records/runlock.py)
            RunDirLock(options.run_dir).acquire()
        except RunDirBusy as exc:
            print(f"nccl-test: {exc}", file=sys.stderr)
            return USER_ERROR_EXIT
        write_manifest(options.run_dir, kind="nccl-test", p2p=decision.to_dict(), extra={"argv": argv})
    return launch(
        "env.nccl.worker",
        [*argv, "--run-dir", str(options.run_dir)],
        nproc=options.gpus,
        nodes=options.nodes,
        explained=(1, USER_ERROR_EXIT),  # a FAIL verdict (1) and bad input (2) were already printed
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a bare torchrun of this module
        return worker.main(argv)
    cuda_gpus = visible_cuda_gpus()
    options = parse_options(argv, cuda_gpus, in_worker=False)
    check_rendezvous(options.nodes)
    return launch_workers(options, argv, cuda_gpus)


if __name__ == "__main__":
    run_cli("nccl-test", main)
