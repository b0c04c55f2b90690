"""nccl-test's rank-0 report: the footer lines, the verdict against the links, and the JSON record."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from env.common.atomic import write_text_atomically
from env.machine.links import Expectation, expected_busbw, judge
from env.machine.nvml import read_snapshot
from env.machine.p2p import P2PDecision, p2p_mode, visible_gpu_indices
from env.nccl.options import Options, format_size
from env.nccl.place import WorkerPlace
from env.rig.launch import USER_ERROR_EXIT
from env.rig.profiles import NCCL_DIST, loaded_nccl, locked_version

LARGE_MESSAGE_MIN_BYTES = 64 << 20  # below this, busbw is latency-bound and says nothing about the links
LARGE_MESSAGE_SPAN = 4  # large-message busbw: the mean over sizes within 4x of the largest


HEADER = (
    "#       size        count      type   redop    root     time   algbw   busbw  #wrong   lat p50   lat p99",
    "#        (B)   (elements)                               (us)  (GB/s)  (GB/s)              (us)      (us)",
)


def format_row(row: Any) -> str:
    return (
        f"{row.bytes:>12} {row.count:>12} {row.type:>9} {row.redop:>7} {row.root:>7} {row.time_us:>8.1f}"
        f" {row.algbw:>7.2f} {row.busbw:>7.2f} {row.wrong:>7} {row.lat_median_us:>9.1f} {row.lat_p99_us:>9.1f}"
    )


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


def collect_versions(device_type: str) -> dict[str, Any]:
    import torch

    loaded = None
    if device_type == "cuda":
        loaded = loaded_nccl(torch)
    pinned = locked_version(NCCL_DIST)
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
    from env.nccl.collectives import launch_overhead

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
