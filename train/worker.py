"""One training process, as started by torchrun through train.launch.

Turns the errors a user can cause into one line and exit code 2 (which the launcher
knows needs nothing added); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from env.common.cli import ArgumentParser, UserError
from env.rig.launch import USER_ERROR_EXIT
from env.rig.lifeline import end_with_parent
from train.checkpoint import CheckpointError
from train.launch import add_run_arguments, resolve_config
from train.trainer import TrainingStopped, train
from train.watchdog import FIRING


def _is_communication_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (killed, crashed, or ended by its watchdog)."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    return isinstance(exc, backend_error) or "Connection closed by peer" in text or "Connection reset" in text


def _out_of_memory_hint(cfg_micro_batch: int, accum: int) -> str:
    smaller = max(1, cfg_micro_batch // 2)
    return f"try MICRO_BATCH={smaller} ACCUM={accum * cfg_micro_batch // smaller} (the same global batch)"


def main(argv: list[str] | None = None) -> int:
    end_with_parent()  # before anything that takes time: a launcher killed meanwhile ends this worker too
    parser = ArgumentParser(prog="python -m train.worker")
    add_run_arguments(parser)
    rank = int(os.environ.get("RANK", 0))
    cfg = None
    try:
        args = parser.parse_args(argv)
        cfg = resolve_config(args, torch.cuda.is_available())
        train(cfg, Path(args.run_dir))
    except (UserError, CheckpointError, TrainingStopped) as exc:
        if rank == 0:  # every rank meets the same problem; one says it
            print(f"torchrig: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except torch.cuda.OutOfMemoryError:
        gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        hint = _out_of_memory_hint(cfg.train.micro_batch, cfg.train.accum) if cfg else "lower MICRO_BATCH"
        print(
            f"torchrig: rank {rank}: MICRO_BATCH={cfg.train.micro_batch if cfg else '?'} does not fit in GPU memory "
            f"({gib:.0f} GiB); {hint}",
            file=sys.stderr,
            flush=True,
        )
        return USER_ERROR_EXIT
    except RuntimeError as exc:
        if not _is_communication_failure(exc):
            raise
        if FIRING.wait(timeout=2.0):  # our own watchdog is reporting and ending this process
            time.sleep(60)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"torchrig: rank {rank}: lost contact with another rank ({first_line})", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: with gloo on torch 2.4, destroying the process group or
    # the DDP reducer while a peer is already gone can block forever in a C++ destructor.
    os._exit(code)
