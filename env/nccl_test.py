"""`make nccl-test`: collective bandwidth and correctness on the torch stack training uses, with a verdict.

`python -m env.nccl_test [flags]`. Started by hand (not inside torchrun), it checks every flag
first, decides P2P from measurements (env.p2p), and starts one worker per GPU (or per CPU
process, on gloo) through env.launch. Each worker runs this same module; rank 0 prints
nccl-tests' table for every collective, bandwidth and version lines, a verdict judged against
what the links should give (env.links), and writes a JSON record. Exit: 0 PASS or WARN,
1 FAIL, 2 bad input.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from env.atomic import write_text_atomically
from env.cli import ArgumentParser, UserError, check_workers, count_arg, real_arg, run_cli
from env.launch import USER_ERROR_EXIT, Nodes, add_node_arguments, check_rendezvous, nodes_from_args
from env.links import Expectation, expected_busbw, judge
from env.nvml import read_snapshot
from env.p2p import P2PDecision, apply_p2p_decision, decide_p2p, p2p_mode, torch_copy_check, visible_gpu_indices

ROOT = Path(__file__).resolve().parent.parent
# The lock the image was built from (it may be a newer CUDA profile's), else the checkout's default lock.
PIN_SOURCES = (Path("/opt/torchrig/requirements.lock"), ROOT / "requirements.txt")
DEFAULT_SIZES = {"cuda": "8:1G:2", "cpu": "8:4M:4"}
# gloo on CPU copies each message through the host at well under a GB/s and holds several copies
# per rank: beyond this a run takes minutes and gigabytes, and says nothing about GPU links.
CPU_MAX_SIZE = 64 << 20
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
LARGE_MESSAGE_MIN_BYTES = 64 << 20  # below this, busbw is latency-bound and says nothing about the links
LARGE_MESSAGE_SPAN = 4  # large-message busbw: the mean over sizes within 4x of the largest
QUIET_RANKS_GRACE_S = 5  # ranks other than local rank 0 give up this much later, so that rank 0 explains
PG_TIMEOUT_MARGIN_S = 30  # the process group's own timeout runs this much behind our watchdog's
JSON_NAME = "nccl_test.json"
DECISION_ENV = "TORCHRIG_P2P_DECISION"  # the launcher's P2P decision, as JSON, handed to its workers
STALL_ENV = "TORCHRIG_TEST_STALL_RANK"  # test-only: this rank never reaches the first collective
HANG_HINT = (
    "usual causes: P2P on GeForce cards (retry with NCCL_P2P_DISABLE=1), ACS or the IOMMU blocking P2P"
    " (disable ACS in the BIOS, or boot with iommu=pt), a too-small /dev/shm (docker --shm-size=16g or --ipc=host),"
    " and across nodes a firewall or the wrong interface (open the ports, set NCCL_SOCKET_IFNAME)"
)


@dataclass
class Options:
    gpus: int
    sizes: list[int]
    dtype: Any  # env.collectives.Dtype; imported with torch, lazily
    ops: list[str]
    min_busbw: float | None
    iters: int
    warmup: int
    run_dir: Path  # manifest.json, and the JSON record unless --json names another path
    json_path: Path
    first_timeout: float
    launch_overhead: bool
    nodes: Nodes


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m env.nccl_test", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), help="workers: default every visible GPU, or 1 CPU process on gloo"
    )
    parser.add_argument("--sizes", help="min:max:factor with K/M/G suffixes (default 8:1G:2 on GPU, 8:4M:4 on CPU)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    parser.add_argument("--ops", default="all_reduce", help="comma list of collectives, or all (default all_reduce)")
    parser.add_argument(
        "--min-busbw",
        type=real_arg("--min-busbw"),
        help="GB/s the large-message busbw must reach (overrides the links)",
    )
    parser.add_argument("--iters", type=count_arg("--iters"), default=20, help="timed calls per size (default 20)")
    parser.add_argument(
        "--warmup", type=count_arg("--warmup"), default=5, help="untimed calls per size first (default 5)"
    )
    parser.add_argument("--json", help=f"the JSON record's path (default RUN_DIR/{JSON_NAME})")
    parser.add_argument("--run-dir", help="directory for the JSON record when --json is not given")
    parser.add_argument(
        "--first-timeout", type=real_arg("--first-timeout"), default=30.0, help="seconds the first collective may take"
    )
    parser.add_argument("--launch-overhead", action="store_true", help="benchmark: time per 8 B call, queued vs waited")
    add_node_arguments(parser)
    return parser


def parse_size(text: str) -> int:
    """A size such as 8, 64K or 1G (binary units, as nccl-tests) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)B?", text.strip(), re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise UserError(f"'{text}' is not a size; use a positive number with an optional K, M or G, e.g. 8:1G:2")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def parse_sizes(spec: str) -> list[int]:
    """nccl-tests' min:max:factor (or min:max, factor 2, or one size) -> the sizes in bytes."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise UserError(f"--sizes {spec}: write min:max:factor, e.g. 8:1G:2")
    try:
        low = parse_size(parts[0])
        high = parse_size(parts[1]) if len(parts) > 1 else low
    except UserError as exc:
        raise UserError(f"--sizes {spec}: {exc}") from None
    factor_text = parts[2].strip() if len(parts) > 2 else "2"
    if not factor_text.isdigit() or int(factor_text) < 2:
        raise UserError(f"--sizes {spec}: the factor '{factor_text}' must be a whole number of at least 2")
    if low > high:
        raise UserError(f"--sizes {spec}: min {parts[0]} is larger than max {parts[1]}; write min:max:factor")
    sizes = [low]
    while sizes[-1] * int(factor_text) <= high:
        sizes.append(sizes[-1] * int(factor_text))
    return sizes


def parse_ops(spec: str, known: list[str]) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError(f"--ops is empty; choose from {', '.join(known)}, or all")
    if "all" in names:
        return list(known)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown op '{name}' in --ops; {hint}choose from {', '.join(known)}, or all")
    return list(dict.fromkeys(names))


def format_size(nbytes: int) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= SIZE_UNITS[unit] and nbytes % SIZE_UNITS[unit] == 0:
            return f"{nbytes // SIZE_UNITS[unit]}{unit}"
    return f"{nbytes}B"


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise UserError(f"{name} {value:g} must be {bound}")


def parse_options(argv: list[str], cuda_gpus: int, *, in_worker: bool) -> Options:
    """Every flag checked before anything starts; raises UserError naming the problem and the fix."""
    from env.collectives import COLLECTIVES, DTYPES

    args = build_parser().parse_args(argv)
    if in_worker:  # inside torchrun the launcher has already fixed the process count
        gpus = args.gpus if args.gpus is not None else check_workers(None, cuda_gpus)
    else:
        gpus = check_workers(args.gpus, cuda_gpus, "--gpus")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype} is not one of {', '.join(DTYPES)}")
    _check_range("--iters", args.iters, 1)
    _check_range("--warmup", args.warmup, 0)
    if args.first_timeout <= 0:
        raise UserError(f"--first-timeout {args.first_timeout:g} must be more than 0 seconds")
    if args.min_busbw is not None:
        _check_range("--min-busbw", args.min_busbw, 0)
    nodes = nodes_from_args(args)
    if nodes.problem():
        raise UserError(nodes.problem())
    # Workers get --run-dir from the launcher, so every process agrees on the default's time stamp.
    run_dir = Path(args.run_dir or f"runs/nccl-test-{time.strftime('%Y%m%d-%H%M%S')}")
    json_path = Path(args.json) if args.json else run_dir / JSON_NAME
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES["cuda" if cuda_gpus else "cpu"])
    if not cuda_gpus and sizes[-1] > CPU_MAX_SIZE:
        raise UserError(
            f"--sizes {args.sizes}: on CPU (gloo) sizes are capped at {format_size(CPU_MAX_SIZE)} (larger ones take "
            "minutes and gigabytes and measure no GPU link); use e.g. --sizes 8:4M:4"
        )
    return Options(
        gpus=gpus,
        sizes=sizes,
        dtype=DTYPES[args.dtype],
        ops=parse_ops(args.ops, list(COLLECTIVES)),
        min_busbw=args.min_busbw,
        iters=args.iters,
        warmup=args.warmup,
        run_dir=run_dir,
        json_path=json_path,
        first_timeout=args.first_timeout,
        launch_overhead=args.launch_overhead,
        nodes=nodes,
    )


class Watchdog:
    """Ends the process with one FAIL line if a step that takes seconds when healthy has not finished in time.

    A hung NCCL communicator or peer copy (the classic: P2P on GeForce cards) otherwise sits until
    the process group's timeout, many minutes later, and then prints pages of traceback, or forever.
    """

    def __init__(self, timeout_s: float, message: str, announce: bool) -> None:
        self.timeout_s = timeout_s
        self.message = message
        self.announce = announce
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        if self.announce:
            print(self.message, flush=True)
        sys.stderr.flush()
        os._exit(1)


# ---- the launcher side ---------------------------------------------------------------------------------------


def launch_workers(options: Options, argv: list[str], cuda_gpus: int) -> int:
    """Decide P2P here, once, with real copies between the GPUs; then start the workers with it in their env."""
    probe_timeout = options.first_timeout + PG_TIMEOUT_MARGIN_S  # room to create a CUDA context on every GPU
    stuck = (
        f"VERDICT: FAIL - a P2P copy between GPUs did not finish in {probe_timeout:g} s;"
        " P2P is broken on this box: retry with NCCL_P2P_DISABLE=1"
    )
    with Watchdog(probe_timeout, stuck, announce=True):
        decision = decide_p2p(read_snapshot(), os.environ, torch_copy_check if cuda_gpus > 1 else None)
    print(f"nccl-test: P2P ({decision.source}): {decision.reason}", flush=True)
    apply_p2p_decision(decision)
    os.environ[DECISION_ENV] = json.dumps(decision.to_dict())
    from env.launch import launch
    from env.manifest import write_manifest
    from env.runlock import RunDirBusy, RunDirLock

    if options.nodes.node_rank == 0:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        try:  # one job per RUN_DIR, held until this launcher exits (env/runlock.py)
            RunDirLock(options.run_dir).acquire()
        except RunDirBusy as exc:
            print(f"nccl-test: {exc}", file=sys.stderr)
            return USER_ERROR_EXIT
        write_manifest(options.run_dir, kind="nccl-test", p2p=decision.to_dict(), extra={"argv": argv})
    return launch(
        "env.nccl_test",
        [*argv, "--run-dir", str(options.run_dir)],
        nproc=options.gpus,
        nodes=options.nodes,
        explained=(1, USER_ERROR_EXIT),  # a FAIL verdict (1) and bad input (2) were already printed
    )


# ---- the worker side -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlace:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @classmethod
    def from_env(cls) -> WorkerPlace:
        world = int(os.environ["WORLD_SIZE"])
        return cls(
            rank=int(os.environ["RANK"]),
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )


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

    from env.collectives import align_ranks

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
    with Watchdog(timeout, hung, announce):
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

    from env.lifeline import end_with_parent

    end_with_parent()

    from env.collectives import Context

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


HEADER = (
    "#       size        count      type   redop    root     time   algbw   busbw  #wrong   lat p50   lat p99",
    "#        (B)   (elements)                               (us)  (GB/s)  (GB/s)              (us)      (us)",
)


def format_row(row: Any) -> str:
    return (
        f"{row.bytes:>12} {row.count:>12} {row.type:>9} {row.redop:>7} {row.root:>7} {row.time_us:>8.1f}"
        f" {row.algbw:>7.2f} {row.busbw:>7.2f} {row.wrong:>7} {row.lat_median_us:>9.1f} {row.lat_p99_us:>9.1f}"
    )


def run_table(options: Options, ctx: Any) -> list[Any]:
    """Every op at every size; rank 0 prints each row as it lands, then the op's nccl-tests footer."""
    from env.collectives import COLLECTIVES, element_count, measure

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


def large_message_busbw(op_rows: list[Any]) -> float | None:
    """Mean busbw over the sizes within LARGE_MESSAGE_SPAN of the largest: what the links sustain."""
    if not op_rows:
        return None
    largest = max(row.bytes for row in op_rows)
    large = [row.busbw for row in op_rows if row.bytes * LARGE_MESSAGE_SPAN >= largest]
    return sum(large) / len(large)


def summarize(rows: list[Any], ops: list[str]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name in ops:
        op_rows = [row for row in rows if row.op == name]
        peak = max(op_rows, key=lambda row: row.busbw)
        summary[name] = {
            "avg_busbw": sum(row.busbw for row in op_rows) / len(op_rows),
            "peak_busbw": peak.busbw,
            "peak_bytes": peak.bytes,
            "large_busbw": large_message_busbw(op_rows),
            "largest_bytes": max(row.bytes for row in op_rows),
            "wrong": sum(row.wrong for row in op_rows),
        }
    return summary


def pinned_nccl_version(sources: tuple[Path, ...] = PIN_SOURCES) -> str | None:
    """The NCCL version pinned (nvidia-nccl-cu12==X) in the first lock file that exists."""
    for lock in sources:
        try:
            text = lock.read_text()
        except OSError:
            continue
        match = re.search(r"^nvidia-nccl-cu\d+==([\w.]+)", text, re.MULTILINE)
        return match.group(1) if match else None
    return None


def collect_versions(device_type: str) -> dict[str, Any]:
    import torch

    loaded = None
    if device_type == "cuda":
        loaded = ".".join(str(part) for part in tuple(torch.cuda.nccl.version())[:3])
    pinned = pinned_nccl_version()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl_loaded": loaded,
        "nccl_pinned": pinned,
        "nccl_matches_pin": loaded == pinned if loaded and pinned else None,
    }


def versions_line(versions: dict[str, Any]) -> str:
    if versions["nccl_loaded"] is None:
        nccl = f"NCCL not loaded (gloo; pinned {versions['nccl_pinned']})"
    else:
        match = {True: "match", False: "MISMATCH", None: "pin unknown"}[versions["nccl_matches_pin"]]
        nccl = f"NCCL {versions['nccl_loaded']} loaded (pinned {versions['nccl_pinned']}: {match})"
    return f"torch {versions['torch']}, CUDA {versions['cuda']}, {nccl}"


def bandwidth_expectation(place: WorkerPlace, device_type: str, largest_bytes: int) -> Expectation:
    """What the links should give, or why the bandwidth cannot be judged on this run."""
    reasons_not_judged = (
        (device_type != "cuda", "no GPU (gloo on CPU); correctness still decides"),
        (place.world == 1, "one rank: no link is crossed"),
        (place.world > place.local_world, "several nodes: the network between them is not modelled; use --min-busbw"),
        (
            largest_bytes < LARGE_MESSAGE_MIN_BYTES,
            f"the largest message ({format_size(largest_bytes)}) is under {format_size(LARGE_MESSAGE_MIN_BYTES)},"
            " too small to reach link bandwidth; use --sizes up to 1G",
        ),
    )
    why_not = next((why for applies, why in reasons_not_judged if applies), None)
    if why_not is not None:
        return Expectation(None, why_not=why_not)
    snapshot = read_snapshot()
    gpus = visible_gpu_indices(snapshot, os.environ)[: place.local_world] if snapshot.ok else []
    return expected_busbw(snapshot, gpus, p2p_mode(os.environ))


def report(options: Options, place: WorkerPlace, device: Any, decision: P2PDecision, rows: list[Any]) -> int:
    summary = summarize(rows, options.ops)
    total_wrong = sum(op["wrong"] for op in summary.values())
    weakest = min(summary, key=lambda name: summary[name]["large_busbw"])
    largest = max(op["largest_bytes"] for op in summary.values())
    expectation = bandwidth_expectation(place, device.type, largest)
    measured = summary[weakest]["large_busbw"]
    verdict = judge(wrong=total_wrong, measured_busbw=measured, expectation=expectation, min_busbw=options.min_busbw)
    versions = collect_versions(device.type)
    peak_op = max(summary, key=lambda name: summary[name]["peak_busbw"])
    peak = summary[peak_op]
    print(f"# Peak busbw          : {peak['peak_busbw']:.2f} GB/s ({peak_op}, {format_size(peak['peak_bytes'])})")
    print(
        f"# Large-message busbw : {measured:.2f} GB/s ({weakest}, sizes from"
        f" {format_size(max(1, largest // LARGE_MESSAGE_SPAN))} to {format_size(largest)})"
    )
    print(f"# Versions            : {versions_line(versions)}")
    print(f"# P2P                 : {decision.source}: {decision.reason}")
    record = {
        "world_size": place.world,
        "nodes": place.world // place.local_world,  # > 1: the busbw crossed the network (make bench's inter-node link)
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "dtype": options.dtype.name,
        "versions": versions,
        "p2p": decision.to_dict(),
        "expected_link": expectation.link,
        "verdict": asdict(verdict),
        "ops": summary,
        "rows": [asdict(row) for row in rows],
    }
    written = write_record(options.json_path, record)
    print(f"VERDICT: {verdict.status} - {verdict.reason}", flush=True)
    if verdict.status == "WARN":
        print(f"nccl-test: WARNING: {verdict.reason}", file=sys.stderr, flush=True)
    return verdict.exit_code if written else USER_ERROR_EXIT


def write_record(path: Path, record: dict[str, Any]) -> bool:
    """Write the JSON record atomically; a path we cannot write is one line, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        print(f"nccl-test: cannot write the JSON record to {path} ({exc.strerror}); pass a writable --json", flush=True)
        return False
    print(f"# JSON                : {path}")
    return True


def report_launch_overhead(ctx: Any) -> int:
    from env.collectives import launch_overhead

    calls = max(ctx.iters, 200)
    queued, each = launch_overhead(ctx, calls)
    if ctx.rank == 0:
        print(
            f"# launch overhead, 8 B all_reduce, {calls} calls, {ctx.world} rank(s) on {ctx.device.type}"
            f" (slowest rank): queued {queued * 1e6:.1f} us/call, each call waited for {each * 1e6:.1f} us/call;"
            f" queueing hides {(each - queued) * 1e6:.1f} us/call",
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    in_worker = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    # CUDA numbers GPUs fastest-first by default; PCI order makes CUDA ordinals match NVML indices.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import torch

    cuda_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not in_worker:
        options = parse_options(argv, cuda_gpus, in_worker=False)
        check_rendezvous(options.nodes)
        return launch_workers(options, argv, cuda_gpus)
    try:
        options = parse_options(argv, cuda_gpus, in_worker=True)
    except UserError as exc:  # every rank meets it; rank 0 says it, and the launcher knows exit 2 needs no more
        if os.environ.get("RANK") == "0":
            print(f"torchrig nccl-test: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    return run_worker(options)


if __name__ == "__main__":
    run_cli("nccl-test", main)
