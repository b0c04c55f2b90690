"""`make train`: check everything a user can get wrong, then start one worker per GPU.

Runs once per node, before any worker exists, so that a typo in a config key, a missing
data path or a bad GPUS value is one line and exit 2 rather than N tracebacks. It also
takes the P2P decision (env/machine/p2p.py) and prepares the run manifest (which rank 0 records once
the resume check passed), then hands the same resolved arguments to torchrun's launcher
(env/rig/launch.py), which runs train.worker. Before any of that it takes the RUN_DIR lock
(env/records/runlock.py) and leaves a run that already reached STEPS alone (train/rundir.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

from env.common.cli import ArgumentParser, UserError, check_workers, count_arg, plain_name, run_cli
from env.common.readfile import ReadRefused, read_json
from env.machine.nvml import read_snapshot
from env.machine.p2p import apply_p2p_decision, decide_p2p, torch_copy_check
from env.records.manifest import MANIFEST_ENV, build_manifest
from env.records.runlock import RunDirLock
from env.rig.launch import add_node_arguments, check_rendezvous, launch, nodes_from_args
from env.rig.runtime import shorthand_keys
from train import plan
from train.config import RunConfig
from train.config_loader import load_config
from train.data import build_dataset
from train.data.split import check_held_out
from train.errors import ConfigError, DataError
from train.memory_bound import check_need, training_need
from train.run import lr_at
from train.rundir import SUMMARY_LIMIT, completed_steps
from train.weights import init_source_config

# Make variables that are shorthands for config keys (make train STEPS=100 == ARGS="train.steps=100"),
# from the one make-variable table.
FLAG_KEYS = shorthand_keys()
# FSDP2 (fully_shard) on CPU/gloo needs torch 2.6; older ones reach for CUDA and fail with a driver error.
FSDP_CPU_TORCH = (2, 6)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments the launcher and its workers share."""
    parser.add_argument("--config", default="", help="config name under train/configs/ or a .yaml path")
    parser.add_argument("--run-dir", default="", help="where metrics, summary, manifest and checkpoints go")
    for flag in FLAG_KEYS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default="")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=3e-4")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides, then the shorthand flags that were given, as key=value too."""
    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) != ""]
    return [*args.overrides, *flags]


def resolve_config(args: argparse.Namespace, has_gpu: bool) -> RunConfig:
    run_dir = Path(args.run_dir) if args.run_dir else None  # train.init_from: a resumed run's model is its own
    source_config = partial(init_source_config, run_dir=run_dir)
    return load_config(args.config or ("small" if has_gpu else "tiny"), _overrides(args), source_config)


def worker_args(args: argparse.Namespace, cfg: RunConfig, run_dir: Path) -> list[str]:
    """The resolved run, as arguments every worker parses the same way (`--flag=value`: a value may start with '-')."""
    return [f"--config={args.config or cfg.name}", f"--run-dir={run_dir}", "--", *_overrides(args)]


def _p2p_decision() -> dict | None:
    """Decide NCCL_P2P_DISABLE from measured facts before the workers inherit the environment."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None

    decision = decide_p2p(read_snapshot(), os.environ, verify_copy=torch_copy_check)
    apply_p2p_decision(decision)
    print(f"torchrig: P2P: {decision.reason}", flush=True)
    return decision.to_dict()


def check_fits(cfg: RunConfig, nproc: int, world: int, has_gpu: bool) -> None:
    """Refuse, before anything is allocated, a run whose state, activations or modules cannot fit
    (train/memory_bound.py)."""
    need = training_need(cfg, world, has_gpu)
    fix = "shrink model.dim, model.n_layers, model.vocab_size, model.n_routed_experts, data.seq_len or MICRO_BATCH"
    check_need(need, f"training model.arch={cfg.model.arch}", fix, workers=nproc, on_gpu=has_gpu)


def warn_short_warmup(cfg: RunConfig) -> None:
    """Say so when the run ends inside its warmup: the learning rate then never reaches train.lr."""
    t = cfg.train
    if t.warmup_steps > t.steps:
        peak = lr_at(t.steps - 1, cfg)
        print(
            f"torchrig: warning: train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the learning "
            f"rate only reaches {peak:.3g} ({peak / t.lr:.0%} of train.lr={t.lr:g}); lower train.warmup_steps to "
            "train at the full rate",
            flush=True,  # on stdout with the launcher's other lines: stderr is for what stops a run
        )


def _preflight(args: argparse.Namespace, has_gpu: bool) -> tuple[RunConfig, Path]:
    """Every check a user's input needs before a worker starts; a UserError is one line, exit 2."""
    import torch

    nodes = nodes_from_args(args)
    cfg = resolve_config(args, has_gpu)
    if nodes.nnodes > 1 and not (args.run_dir and nodes.master_addr):
        raise ConfigError("multi-node runs need RUN_DIR and MASTER_ADDR (the same on every node)")
    if nodes.problem():  # the same checks as nccl-test's: a NODE_RANK outside NNODES would wait forever
        raise ConfigError(nodes.problem())
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if cfg.train.strategy == "fsdp" and not has_gpu and version < FSDP_CPU_TORCH:
        raise ConfigError(
            f"STRATEGY=fsdp on CPU needs torch >= 2.6 (this is {torch.__version__}) or a GPU; use STRATEGY=ddp here"
        )
    workers = check_workers(args.gpus, torch.cuda.device_count() if has_gpu else 0, "--gpus")
    check_fits(cfg, workers, workers * nodes.nnodes, has_gpu)
    if has_gpu:  # make plan's figures for this box; on the CPU, VRAM is not what limits a run
        plan.check_fits(cfg, plan.Box(workers * nodes.nnodes, torch.cuda.get_device_properties(0).total_memory))
    warn_short_warmup(cfg)
    run_dir = Path(args.run_dir or f"runs/{plain_name(cfg.name)}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        build_dataset(cfg)  # fails fast on a bad data path, and builds the corpus cache once
        if cfg.data.val_path:
            check_held_out(cfg)  # other data than data.path, of the same tokenizer
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename} ({exc.strerror}); check data.path and its permissions") from None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create RUN_DIR {run_dir} ({exc.strerror}); choose a writable RUN_DIR") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"RUN_DIR {run_dir} is not writable by this user; choose a writable RUN_DIR")
    check_rendezvous(nodes)
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.launch", description=__doc__)
    add_run_arguments(parser)
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), help="workers on this node (default: every GPU, or 1 CPU process)"
    )
    add_node_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    # Number GPUs as NVML does (PCI bus order), so the P2P decision and the workers agree on "GPU 1".
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    has_gpu = torch.cuda.is_available()
    nproc = check_workers(args.gpus, torch.cuda.device_count() if has_gpu else 0, "--gpus")
    nodes = nodes_from_args(args)
    cfg, run_dir = _preflight(args, has_gpu)
    # Node 0 holds the lock for the job (RUN_DIR is shared storage); other nodes can only join its rendezvous.
    lock = RunDirLock(run_dir).acquire() if nodes.node_rank == 0 else None
    reached = completed_steps(run_dir, cfg.train.steps)
    if reached is not None:
        print(
            f"torchrig: {run_dir} is already complete ({reached} steps, figures in summary.json); "
            "nothing was changed: give a larger STEPS to train on, or another RUN_DIR",
            flush=True,
        )
        return 0
    p2p = _p2p_decision()
    if nodes.node_rank == 0:
        # Rank 0 records this launch in manifest.json once the resume check passed (train/trainer.py).
        os.environ[MANIFEST_ENV] = json.dumps(build_manifest(run_dir, kind="train", config=cfg.to_dict(), p2p=p2p))
    print(
        f"torchrig: training {cfg.name} on {nproc * nodes.nnodes} {'GPU(s)' if has_gpu else 'CPU process(es)'}, "
        f"global batch {nproc * nodes.nnodes * cfg.train.micro_batch * cfg.train.accum}, run dir {run_dir}",
        flush=True,
    )
    started = time.time()
    code = launch("train.worker", worker_args(args, cfg, run_dir), nproc, nodes=nodes)
    if lock is not None:
        lock.release()
    if code > 128 and _stopped_cleanly(run_dir, started):
        return 0  # preempted: the workers saved a checkpoint and said so
    if code == 0 and nodes.node_rank == 0:
        print(f"torchrig: done; figures in {run_dir / 'summary.json'}, per step in {run_dir / 'metrics.jsonl'}")
    return code


def _stopped_cleanly(run_dir: Path, since: float) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists() or summary.stat().st_mtime < since:
        return False
    try:
        record = read_json(summary, SUMMARY_LIMIT)
    except ReadRefused:
        return False
    return isinstance(record, dict) and bool(record.get("stopped_early"))


if __name__ == "__main__":
    run_cli("train", main)
