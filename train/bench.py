"""`make bench`: the 1→N GPU scaling table — measured, predicted from the links, judged against a baseline.

    python -m train.bench --gpus N [--counts 1,2,3] [--config C] [--steps S] [--run-dir D]
                          [--baseline NAME|PATH] [--nccl-json PATH] [--link NAME]
                          [--micro-batch B] [--accum A] [--precision P] [--strategy S] [--seed X] [key=value ...]

Weak scaling, as published scaling tables are made: the per-GPU micro-batch stays fixed and the
global batch is n x micro_batch x accum. For every count n, a real training job runs through
`python -m train.launch --gpus n` on synthetic data (so the data source never limits it), in
RUN_DIR/n{n}/, and its summary.json gives the measured figures (steady state: the summary drops
the first logged windows). From them:

- measured: samples/s, speedup over the 1-GPU row, efficiency (speedup / n), tokens/s, MFU, step
  time; compute = the 1-GPU step time, exposed communication = step_n - step_1 (what the
  other ranks' traffic adds to a step after whatever overlap DDP achieved).
- predicted: the bytes each step moves (parameters x wire bytes per element: fp32 gradients, or
  bf16/fp16 with DDP compression; FSDP's all-gathers and reduce-scatter) over a ring, whose time
  is bus_factor(n) x bytes / busbw (nccl-tests' definition of busbw, so a measured busbw plugs in
  directly). busbw comes from `make nccl-test JSON=...` (--nccl-json), else from the links NVML
  reports (env/links.py), else from a named assumption (--link). Predicted step = compute + comm
  with no overlap: an upper bound on the step time, a lower bound on the speedup.
- baseline (--baseline): a previous bench.json or a shipped claim (train/baselines/NAME.json);
  per row and overall REPRODUCED (within ±10% of its samples/s), BETTER or REFUTED, and NOT
  COMPARABLE where the device or the workload differs: a CPU run cannot judge a GPU claim.

Noise: every count runs --repeats times (interleaved: 1..N, then 1..N again, so a load that comes
and goes hits every count), and every steady logged window of every repeat is one measurement. A
point is the median of its measurements; its spread is their half-range around it. When a spread is
wider than ±10%, or an efficiency stays above 100% even at the edge of the spreads, the figures are
NOISE-BOUND: the table's noise column and a NOISE line say which and why, and the exit code is 3.

Writes RUN_DIR/bench.json (loadable as a later --baseline), bench.csv, bench.md, bench.png (when
matplotlib is installed) and manifest.json. Exit: 0 done, 2 bad input, 3 done but the figures are
noise-bound (rerun on an idle machine, or with more STEPS), else a failed run's code.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env.cli import ArgumentParser, UserError, check_workers, count_arg, load_json, run_cli
from env.lifeline import signal_when_parent_dies
from env.links import LINK_KINDS, NETWORK_LINKS, PCIE_LANE_GBPS
from env.runlock import RunDirLock
from env.runtime import shorthand_keys
from train.config import RunConfig, load_config

BASELINE_DIR = Path(__file__).parent / "baselines"
DEFAULT_STEPS = 40
LOG_WINDOWS = 8  # logged windows per run; the summary takes the median over the steady ones
TOLERANCE = 0.10  # a baseline is REPRODUCED within ±10% of its samples/s
SCHEMA = 1
DEFAULT_REPEATS = 2  # runs per count; with the logged windows of each, several measurements per point
NOISE_SPREAD = 0.10  # a point whose measurements spread wider than ±10% around its median is noise-bound
NOISE_EXIT = 3  # the table is written, but its figures are noise-bound
PROGRESS_POLL_S = 2.0
# Make-variable shorthands train.launch accepts as flags; passed through unchanged.
# The training shorthands of the one make-variable table; bench has its own --steps.
LAUNCH_FLAGS = tuple(flag for flag in shorthand_keys() if flag != "steps")


class BenchError(UserError):
    """Bad input: one line naming the problem and the fix, exit 2."""


# ---- bandwidth: measured, from the links, or assumed -----------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    busbw_gbps: float
    source: str  # in words, printed under the table
    measured: bool


def _pcie_busbw(generation: int, kind: str) -> float:
    """What NCCL reaches on a x16 link of this generation, by env/links.py's shares."""
    return PCIE_LANE_GBPS[generation] * 16 * LINK_KINDS[kind].efficiency


# Named assumptions for --link: large-message all-reduce busbw in GB/s.
LINK_ASSUMPTIONS: dict[str, tuple[str, float]] = {
    "pcie4-host": ("PCIe 4.0 x16 without P2P (through host memory)", _pcie_busbw(4, "pcie_host")),
    "pcie4-p2p": ("PCIe 4.0 x16 with P2P", _pcie_busbw(4, "pcie_p2p")),
    "pcie5-host": ("PCIe 5.0 x16 without P2P (through host memory)", _pcie_busbw(5, "pcie_host")),
    "pcie5-p2p": ("PCIe 5.0 x16 with P2P", _pcie_busbw(5, "pcie_p2p")),
    "nvlink4": ("NVLink 4, 18 links (H100/H200 SXM)", 18 * 25.0 * LINK_KINDS["nvlink"].efficiency),
    "cpu-gloo": ("gloo between processes on one host (rough)", 2.0),
    # Between nodes (env/links.py): the ring's slowest hop once the job spans nodes.
    **{name: (link.label, link.busbw_gbps) for name, link in NETWORK_LINKS.items()},
}
# Without a measurement or NVML's link facts: the reference box's link on GPUs, gloo on the CPU.
DEFAULT_LINK = {"cuda": "pcie4-host", "cpu": "cpu-gloo"}


def assumed_bandwidth(link: str) -> Bandwidth:
    if link not in LINK_ASSUMPTIONS:
        raise BenchError(f"--link {link} is not one of {', '.join(LINK_ASSUMPTIONS)}; or measure it with --nccl-json")
    label, busbw = LINK_ASSUMPTIONS[link]
    return Bandwidth(busbw, f"ASSUMED {busbw:.1f} GB/s for {label} (--link {link}; measure it with --nccl-json)", False)


def bandwidth_from_nccl_json(path: Path) -> Bandwidth:
    """The large-message all_reduce busbw of an env.nccl_test JSON record."""
    fix = f"rerun make nccl-test GPUS=2 (or more) OPS=all_reduce JSON={path}"
    record = load_json(path, "--nccl-json", fix, BenchError)
    ops = record.get("ops") if isinstance(record, dict) else None
    op = ops.get("all_reduce") if isinstance(ops, dict) else None
    op = op if isinstance(op, dict) else {}
    busbw = op.get("large_busbw") or op.get("peak_busbw")
    if not isinstance(busbw, (int, float)) or isinstance(busbw, bool) or not math.isfinite(busbw) or busbw <= 0:
        raise BenchError(
            f"--nccl-json {path} holds no all_reduce bus bandwidth (a 1-rank run crosses no link, or it is not "
            f"an env.nccl_test record); {fix}"
        )
    world = record.get("world_size", "?")
    nodes = record.get("nodes", 1)
    # Across nodes the network is the ring's slowest hop: that busbw is what a job spanning those nodes gets.
    where = f"{world} ranks on {nodes} nodes: inter-node" if isinstance(nodes, int) and nodes > 1 else f"{world} ranks"
    return Bandwidth(float(busbw), f"MEASURED {busbw:.1f} GB/s all_reduce busbw ({where}) from {path}", True)


def bandwidth_from_links(gpu_count: int) -> Bandwidth | None:
    """What NVML's link facts say a ring over the first gpu_count GPUs should reach; None when unknown."""
    from env.links import expected_busbw
    from env.nvml import read_snapshot
    from env.p2p import apply_p2p_decision, decide_p2p, p2p_mode, visible_gpu_indices

    snapshot = read_snapshot()
    if not snapshot.ok:
        return None
    environ = dict(os.environ)
    apply_p2p_decision(decide_p2p(snapshot, environ, None), environ)
    gpus = visible_gpu_indices(snapshot, environ)[:gpu_count]
    expectation = expected_busbw(snapshot, gpus, p2p_mode(environ))
    if expectation.busbw_gbps is None:
        return None
    return Bandwidth(
        expectation.busbw_gbps,
        f"EXPECTED {expectation.busbw_gbps:.1f} GB/s for {expectation.link} (NVML facts, env/links.py; "
        "measure it with --nccl-json)",
        False,
    )


def resolve_bandwidth(nccl_json: str, link: str, device_type: str, max_count: int) -> Bandwidth:
    if nccl_json:
        return bandwidth_from_nccl_json(Path(nccl_json))
    if link:
        return assumed_bandwidth(link)
    from_links = bandwidth_from_links(max_count) if device_type == "cuda" and max_count > 1 else None
    return from_links or assumed_bandwidth(DEFAULT_LINK[device_type])


# ---- the communication each step needs ---------------------------------------------------------------------


def _ring_all_reduce(n: int) -> float:
    return 2 * (n - 1) / n


def _ring_gather_or_scatter(n: int) -> float:
    return (n - 1) / n


@dataclass(frozen=True)
class Transfer:
    """One collective a step runs: time = bus_factor(n) x payload bytes / busbw (nccl-tests' busbw)."""

    collective: str
    payload: str  # "gradients" or "parameters"
    bus_factor: Callable[[int], float]
    per_micro_batch: bool  # FSDP gathers parameters for every micro-batch; gradients reduce once per step


# What each strategy moves per optimizer step. Small collectives (the loss, MoE counts) are latency, not bytes.
COMM_PLANS: dict[str, tuple[Transfer, ...]] = {
    "ddp": (Transfer("all_reduce", "gradients", _ring_all_reduce, per_micro_batch=False),),
    "fsdp": (
        Transfer("all_gather", "parameters", _ring_gather_or_scatter, per_micro_batch=True),  # forward
        Transfer("all_gather", "parameters", _ring_gather_or_scatter, per_micro_batch=True),  # backward (resharded)
        Transfer("reduce_scatter", "gradients", _ring_gather_or_scatter, per_micro_batch=False),
    ),
}
HALF_PRECISIONS = ("bf16", "fp16")


def wire_element_bytes(payload: str, strategy: str, precision: str, compression: str) -> int:
    """Bytes per element on the wire: fp32 gradients unless DDP compresses them; FSDP gathers in the AMP dtype."""
    if payload == "parameters":
        return 2 if precision in HALF_PRECISIONS else 4
    return 2 if strategy == "ddp" and compression in HALF_PRECISIONS else 4


@dataclass(frozen=True)
class CommPlan:
    strategy: str
    params: int
    accum: int
    element_bytes: dict[str, int]  # payload -> bytes per element

    @classmethod
    def for_run(cls, params: int, strategy: str, precision: str, compression: str, accum: int) -> CommPlan:
        sizes = {
            t.payload: wire_element_bytes(t.payload, strategy, precision, compression) for t in COMM_PLANS[strategy]
        }
        return cls(strategy, params, accum, sizes)

    def payload_bytes(self, payload: str) -> int:
        return self.params * self.element_bytes[payload]

    def seconds(self, n: int, busbw_gbps: float) -> float:
        """Predicted communication time per optimizer step on n ranks, nothing overlapped."""
        total = 0.0
        for transfer in COMM_PLANS[self.strategy]:
            calls = self.accum if transfer.per_micro_batch else 1
            total += calls * transfer.bus_factor(n) * self.payload_bytes(transfer.payload) / (busbw_gbps * 1e9)
        return total

    def describe(self) -> str:
        parts = [
            f"{t.collective} of {t.payload} ({self.payload_bytes(t.payload) / 1e6:,.1f} MB)"
            + (f" x{self.accum}" if t.per_micro_batch and self.accum > 1 else "")
            for t in COMM_PLANS[self.strategy]
        ]
        return f"{self.params:,} parameters; per step: {', '.join(parts)}"


# ---- the table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str  # "run", "measured", "predicted" or "baseline": which numbers are which
    fmt: Callable[[Any], str]


def _number(spec: str) -> Callable[[Any], str]:
    return lambda value: format(value, spec)


COLUMNS: tuple[Column, ...] = (
    Column("gpus", "GPUs", "run", str),
    Column("global_batch", "global batch", "run", str),
    Column("samples_per_sec", "samples/s", "measured", _number(",.1f")),
    Column("spread", "spread", "measured", lambda v: f"±{v:.0%}"),
    Column("speedup", "speedup", "measured", lambda v: f"{v:.2f}×"),
    Column("efficiency", "efficiency", "measured", _number(".0%")),
    Column("tokens_per_sec", "tokens/s", "measured", _number(",.0f")),
    Column("mfu", "MFU", "measured", _number(".1%")),
    Column("step_ms", "step ms", "measured", _number(".1f")),
    Column("compute_ms", "compute ms", "measured", _number(".1f")),
    Column("exposed_comm_ms", "exposed comm ms", "measured", _number("+.1f")),
    Column("noise", "noise", "measured", str),
    Column("pred_comm_ms", "pred. comm ms", "predicted", _number(".1f")),
    Column("pred_step_ms", "pred. step ms", "predicted", _number(".1f")),
    Column("pred_samples_per_sec", "pred. samples/s", "predicted", _number(",.1f")),
    Column("pred_speedup", "pred. speedup", "predicted", lambda v: f"{v:.2f}×"),
    Column("baseline_samples_per_sec", "baseline samples/s", "baseline", _number(",.1f")),
    Column("baseline_speedup", "baseline speedup", "baseline", lambda v: f"{v:.2f}×"),
    Column("vs_baseline", "measured/baseline", "baseline", _number(".2f")),
    Column("verdict", "verdict", "baseline", str),
)


def columns_for(with_baseline: bool) -> list[Column]:
    return [c for c in COLUMNS if with_baseline or c.kind != "baseline"]


@dataclass(frozen=True)
class Point:
    """One count's measurements (samples/s of every steady window of every repeat): median and spread."""

    samples_per_sec: float
    step_ms: float
    low: float
    high: float
    measurements: int

    @classmethod
    def of(cls, summary: dict[str, Any]) -> Point:
        """From a summary with "windows" (the bench adds them), else from its one steady figure."""
        windows = summary.get("windows") or [
            {"samples_per_sec": summary["samples_per_sec"], "step_ms": summary["step_ms"]}
        ]
        rates = [w["samples_per_sec"] for w in windows]
        return cls(
            statistics.median(rates),
            statistics.median(w["step_ms"] for w in windows),
            min(rates),
            max(rates),
            len(rates),
        )

    @property
    def spread(self) -> float:
        """Half the range of the measurements, relative to the median: ±spread."""
        return (self.high - self.low) / 2 / self.samples_per_sec


def measured_rows(summaries: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured columns from each count's summary.json (and its windows); speedup and comm relative to
    the 1-GPU run; the noise judgement of every row (noise_findings)."""
    points = {n: Point.of(summary) for n, summary in summaries.items()}
    one = points[1]
    rows = []
    for n, summary in sorted(summaries.items()):
        point = points[n]
        speedup = point.samples_per_sec / one.samples_per_sec
        rows.append(
            {
                "gpus": n,
                "global_batch": summary["global_batch"],
                "samples_per_sec": point.samples_per_sec,
                "spread": point.spread,
                "measurements": point.measurements,
                "speedup": speedup,
                "efficiency": speedup / n,
                # The efficiency at the edges of both spreads: the slowest n-run over the fastest 1-run, and back.
                "efficiency_low": point.low / one.high / n,
                "efficiency_high": point.high / one.low / n,
                "tokens_per_sec": summary.get("tokens_per_sec"),
                "mfu": summary.get("mfu"),
                "step_ms": point.step_ms,
                "compute_ms": one.step_ms,
                "exposed_comm_ms": point.step_ms - one.step_ms,
            }
        )
    for row in rows:
        row["noise"] = row_noise(row)
    return rows


def row_noise(row: dict[str, Any], limit: float = NOISE_SPREAD) -> str:
    """Why a row's figures are noise-bound, in a few words, or "ok"."""
    problems = []
    if row["spread"] > limit:
        problems.append(f"spread ±{row['spread']:.0%}")
    if row["efficiency_low"] > 1:
        problems.append(f"efficiency >100% (≥{row['efficiency_low']:.0%})")
    return "NOISE: " + ", ".join(problems) if problems else "ok"


def noise_findings(rows: list[dict[str, Any]], unit: str, limit: float = NOISE_SPREAD) -> list[str]:
    """One sentence per noise-bound row; empty when every point is within the limit and no efficiency
    exceeds 100% beyond the spreads. More than linear scaling is not speed: the 1-count run was slowed."""
    findings = []
    for row in rows:
        n, where = row["gpus"], counted(row["gpus"], unit)
        if row["spread"] > limit:
            findings.append(
                f"{where}: samples/s spread ±{row['spread']:.0%} over {row['measurements']} measurements "
                f"(more than ±{limit:.0%})"
            )
        if row["efficiency_low"] > 1:
            findings.append(
                f"{where}: efficiency {row['efficiency']:.0%} ({row['speedup']:.2f}× on {n}) stays above 100% "
                f"even at the edge of the spreads ({row['efficiency_low']:.0%}): the 1-{unit} run was slowed"
            )
    return findings


def add_prediction(rows: list[dict[str, Any]], plan: CommPlan, busbw_gbps: float) -> None:
    """Predicted step = the 1-GPU step (compute) + the ring's time for the step's bytes, no overlap."""
    one = next(row for row in rows if row["gpus"] == 1)
    for row in rows:
        n = row["gpus"]
        comm_ms = plan.seconds(n, busbw_gbps) * 1000
        pred_step = one["step_ms"] + comm_ms
        pred_speedup = n * one["step_ms"] / pred_step  # weak scaling: n times the samples per step
        row.update(
            pred_comm_ms=comm_ms,
            pred_step_ms=pred_step,
            pred_speedup=pred_speedup,
            pred_samples_per_sec=pred_speedup * one["samples_per_sec"],
        )


# ---- baselines ----------------------------------------------------------------------------------------------

REPRODUCED, BETTER, REFUTED, NOT_COMPARABLE = "REPRODUCED", "BETTER", "REFUTED", "NOT COMPARABLE"
MIXED = "mixed"  # a baseline's precision "mixed" accepts bf16 or fp16 autocast


def _same(ours: Any, theirs: Any) -> bool:
    return ours == theirs


def _same_precision(ours: Any, theirs: Any) -> bool:
    return ours == theirs or (theirs == MIXED and ours in HALF_PRECISIONS)


def _same_overrides(ours: Any, theirs: Any) -> bool:
    return sorted(ours) == sorted(theirs)


# The workload keys a baseline may fix, and how ours must match; keys a baseline leaves out are not compared.
WORKLOAD_MATCHERS: dict[str, Callable[[Any, Any], bool]] = {
    "config": _same,
    "precision": _same_precision,
    "strategy": _same,
    "micro_batch": _same,
    "accum": _same,
    "grad_compression": _same,
    "model_overrides": _same_overrides,
}


def resolve_baseline(spec: str) -> Path:
    """A shipped name (train/baselines/NAME.json) or a path to a bench.json."""
    if spec.endswith(".json") or os.sep in spec:
        path = Path(spec)
        if not path.is_file():
            raise BenchError(
                f"baseline file {spec} does not exist; give a previous RUN_DIR/bench.json or a shipped name"
            )
        return path
    path = BASELINE_DIR / f"{spec}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in BASELINE_DIR.glob("*.json"))) or "none"
        raise BenchError(f"unknown baseline '{spec}'; shipped: {shipped}; or give the path to a previous bench.json")
    return path


def load_baseline(path: Path) -> dict[str, Any]:
    fix = "give a bench.json or a shipped name"
    data = load_json(path, "baseline", fix, BenchError)
    rows = data.get("rows") if isinstance(data, dict) else None

    def usable(row: object) -> bool:
        if not isinstance(row, dict):
            return False
        gpus, rate = row.get("gpus"), row.get("samples_per_sec")
        numbers = isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1
        return numbers and isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate)

    if not isinstance(rows, list) or not rows or not all(usable(r) for r in rows):
        raise BenchError(f"baseline {path} has no rows with gpus and samples_per_sec; {fix}")
    data.setdefault("name", path.stem)
    return data


def same_device(ours: str, theirs: str) -> bool:
    """The same GPU model: the same env/peaks.py row where both have one, else the same name."""
    from env.peaks import find_row

    row_ours, row_theirs = find_row(ours), find_row(theirs)
    if row_ours and row_theirs:
        return row_ours.label == row_theirs.label
    return ours.strip().lower() == theirs.strip().lower()


def incomparable_reasons(device: str, workload: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Why this run can neither reproduce nor refute the baseline; empty when it can."""
    reasons = []
    theirs_device = baseline.get("device", "unknown")
    if not same_device(device, theirs_device):
        reasons.append(f"this run is on {device}, the baseline on {theirs_device}: a different device cannot judge it")
    theirs = baseline.get("workload", {})
    for key, matches in WORKLOAD_MATCHERS.items():
        if key in theirs and key in workload and not matches(workload[key], theirs[key]):
            reasons.append(f"{key} is {workload[key]!r} here but {theirs[key]!r} in the baseline")
    return reasons


def row_verdict(ratio: float, tolerance: float = TOLERANCE) -> str:
    if ratio > 1 + tolerance:
        return BETTER
    if ratio >= 1 - tolerance:
        return REPRODUCED
    return REFUTED


def overall_verdict(verdicts: list[str]) -> str:
    if not verdicts:
        return NOT_COMPARABLE
    if REFUTED in verdicts:
        return REFUTED
    return BETTER if all(v == BETTER for v in verdicts) else REPRODUCED


def add_baseline(rows: list[dict[str, Any]], baseline: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """Baseline columns on each row with a matching count; returns the overall judgement.

    `reasons` say why the whole run cannot judge the baseline (device, workload); a row whose global
    batch differs from the baseline's row cannot judge that row.
    """
    by_count = {int(r["gpus"]): r for r in baseline["rows"]}
    notes, verdicts = [], []
    for row in rows:
        theirs = by_count.get(row["gpus"])
        if theirs is None:
            row.update(baseline_samples_per_sec=None, baseline_speedup=None, vs_baseline=None, verdict="-")
            continue
        ratio = row["samples_per_sec"] / theirs["samples_per_sec"]
        batch_differs = "global_batch" in theirs and theirs["global_batch"] != row["global_batch"]
        if batch_differs:
            notes.append(f"GPUS={row['gpus']}: global batch {row['global_batch']} here, {theirs['global_batch']} there")
        verdict = NOT_COMPARABLE if reasons or batch_differs else row_verdict(ratio)
        row.update(
            baseline_samples_per_sec=theirs["samples_per_sec"],
            baseline_speedup=theirs.get("speedup"),
            vs_baseline=ratio,
            verdict=verdict,
        )
        if verdict != NOT_COMPARABLE:
            verdicts.append(verdict)
    judged = {"name": baseline["name"], "device": baseline.get("device")}
    if reasons or not verdicts:
        return judged | {"overall": NOT_COMPARABLE, "reasons": [*reasons, *notes] or ["no count in common"]}
    return judged | {"overall": overall_verdict(verdicts), "reasons": notes}


# ---- rendering ----------------------------------------------------------------------------------------------


def cell(column: Column, value: Any) -> str:
    return "-" if value is None else column.fmt(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    table = [[c.header for c in columns]] + [[cell(c, row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(text.rjust(w) for text, w in zip(line, widths, strict=True)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def legend(bench: dict[str, Any]) -> list[str]:
    prediction = bench["prediction"]
    lines = [
        f"workload: {bench['config']} · {bench['workload']['precision']} · {bench['workload']['strategy']} · "
        f"micro-batch {bench['workload']['micro_batch']} x accum {bench['workload']['accum']} per "
        f"{bench['unit']} (weak scaling) · synthetic data · {bench['steps']} steps per run · device {bench['device']}",
        "measured: samples/s, tokens/s, MFU and step ms from each run's summary.json (steady-state median); "
        "compute = the 1-GPU step; exposed comm = step - compute",
        f"predicted: compute + {prediction['plan']} over a ring at {prediction['bandwidth']['source']}; "
        "no overlap assumed, so pred. step is an upper bound and pred. speedup a lower bound",
    ]
    if bench.get("baseline"):
        judged = bench["baseline"]
        lines.append(
            f"baseline: {judged['name']} ({judged['device']}): REPRODUCED within ±{TOLERANCE:.0%} of its samples/s, "
            "BETTER above, REFUTED below"
        )
    return lines


def noise_lines(noise: dict[str, Any]) -> list[str]:
    if not noise["bound"]:
        return [
            f"noise: every point within ±{noise['limit']:.0%} over {noise['measurements']} measurements or more, "
            "no efficiency above 100% beyond its spread"
        ]
    return [
        f"NOISE-BOUND: these figures are not to be trusted (exit {NOISE_EXIT}): " + "; ".join(noise["findings"]),
        "NOISE-BOUND: rerun on an idle machine (check top, nvidia-smi), or with more STEPS",
    ]


def verdict_lines(judged: dict[str, Any] | None) -> list[str]:
    if judged is None:
        return []
    notes = f" - {'; '.join(judged['reasons'])}" if judged["reasons"] else ""
    return [f"VERDICT vs {judged['name']}: {judged['overall']}{notes}"]


def write_outputs(run_dir: Path, bench: dict[str, Any], columns: list[Column]) -> list[str]:
    """bench.json, bench.csv, bench.md and (with matplotlib) bench.png; returns the console report."""
    (run_dir / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    with open(run_dir / "bench.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([c.key for c in columns])
        writer.writerows([["" if row.get(c.key) is None else row.get(c.key) for c in columns] for row in bench["rows"]])
    report = [
        markdown_table(bench["rows"], columns),
        "",
        *legend(bench),
        *noise_lines(bench["noise"]),
        *verdict_lines(bench.get("baseline")),
    ]
    (run_dir / "bench.md").write_text(
        f"# Scaling: {bench['config']} on 1..{counted(bench['rows'][-1]['gpus'], bench['unit'])}\n\n"
        + "\n".join(report)
        + "\n"
    )
    judged = bench.get("baseline")
    comparable = judged is not None and judged["overall"] != NOT_COMPARABLE  # plot no baseline it cannot judge
    skipped = write_plot(run_dir / "bench.png", bench["rows"], bench["unit"], comparable)
    written = "bench.json, bench.csv, bench.md" + (", bench.png" if skipped is None else "")
    report.append(f"written: {written}, manifest.json in {run_dir}")
    if skipped:
        report.append(f"bench.png skipped: {skipped}")
    return report


def write_plot(path: Path, rows: list[dict[str, Any]], unit: str, with_baseline: bool) -> str | None:
    """Samples/s and efficiency against GPUs; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    counts = [row["gpus"] for row in rows]
    figure, (throughput, efficiency) = plt.subplots(1, 2, figsize=(10, 4))
    throughput.plot(counts, [r["samples_per_sec"] for r in rows], "o-", label="measured")
    throughput.plot(counts, [r["pred_samples_per_sec"] for r in rows], "s--", label="predicted (no overlap)")
    if with_baseline:
        judged = [(r["gpus"], r["baseline_samples_per_sec"]) for r in rows if r["baseline_samples_per_sec"]]
        throughput.plot([n for n, _ in judged], [v for _, v in judged], "^:", label="baseline")
    throughput.set(xlabel=plural(unit), ylabel="samples/s", title="throughput", xticks=counts)
    # Error bars to the edges of the spreads; a noise-bound point is drawn where it is, never clipped.
    bars = [
        [r["efficiency"] - r["efficiency_low"] for r in rows],
        [r["efficiency_high"] - r["efficiency"] for r in rows],
    ]
    efficiency.errorbar(counts, [r["efficiency"] for r in rows], yerr=bars, fmt="o-", capsize=3, label="measured")
    efficiency.plot(counts, [r["pred_speedup"] / r["gpus"] for r in rows], "s--", label="predicted (no overlap)")
    efficiency.set(
        xlabel=plural(unit), ylabel="speedup / count", title="scaling efficiency", xticks=counts,
        ylim=efficiency_limits(rows),
    )  # fmt: skip
    for axes in (throughput, efficiency):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def efficiency_limits(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """The efficiency axis: 0 to 110%, or higher so that every measured point and its spread fit."""
    top = max([1.0, *(r["efficiency_high"] for r in rows), *(r["pred_speedup"] / r["gpus"] for r in rows)])
    return 0.0, top * 1.1


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("s") else "s")


def counted(n: int, unit: str) -> str:
    """ "1 GPU", "3 GPUs", "2 CPU processes"."""
    return f"{n} {unit if n == 1 else plural(unit)}"


# ---- running the jobs ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: RunConfig
    counts: list[int]
    steps: int
    run_dir: Path
    launch_flags: list[str]  # --micro-batch 32 ... as given
    overrides: list[str]  # the user's key=value
    device_type: str  # "cuda" or "cpu"
    repeats: int = DEFAULT_REPEATS

    @property
    def unit(self) -> str:
        return "GPU" if self.device_type == "cuda" else "CPU process"


def parse_counts(text: str, gpus: int, unit: str) -> list[int]:
    """1..GPUS, or the --counts list: it must hold 1 and stay within GPUS."""
    if not text:
        return list(range(1, gpus + 1))
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BenchError(f"--counts {text} is not a comma list of whole numbers, e.g. --counts 1,2,3") from None
    if not counts or counts[0] != 1:
        raise BenchError(f"--counts {text} must include 1: speedup and the prediction are relative to the 1-{unit} run")
    if counts[-1] > gpus:
        raise BenchError(f"--counts {text} asks for {counted(counts[-1], unit)} but GPUS is {gpus}; raise GPUS")
    return counts


def run_dir_of(plan: Plan, n: int, repeat: int) -> Path:
    """RUN_DIR/n{n} for the first run of a count, RUN_DIR/n{n}/repeat-{k} for the k-th after it."""
    return plan.run_dir / f"n{n}" / (f"repeat-{repeat}" if repeat > 1 else "")


def launch_command(plan: Plan, n: int, repeat: int = 1) -> list[str]:
    log_every = max(1, plan.steps // LOG_WINDOWS)
    return [
        sys.executable, "-m", "train.launch", "--gpus", str(n), "--config", plan.cfg.name,
        "--run-dir", str(run_dir_of(plan, n, repeat)), "--steps", str(plan.steps), *plan.launch_flags,
        # No checkpoint before the last step; the summary's windows never include saving anyway.
        f"train.log_every={log_every}", f"train.ckpt_every={plan.steps}", *plan.overrides,
        "data.source=synthetic",  # benchmarks measure the step, not the data source
        "train.eval_every=0",  # nor the validation
    ]  # fmt: skip


def steady_windows(run_dir: Path) -> list[dict[str, float]]:
    """samples/s and step ms of each steady logged window of a finished run (what its summary's medians are over)."""
    from train.metrics import steady

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"samples_per_sec": r["samples_per_sec"], "step_ms": r["step_ms"]} for r in steady(rows)]


def progress_line(where: str, step: int, steps: int, elapsed_s: float) -> str:
    """bench: 2 CPU processes (run 1 of 2): step 10/40, eta 0m30s — the ETA from the run's mean step so far."""
    from train.metrics import format_duration

    eta = format_duration(elapsed_s / step * (steps - step)) if step else "?"
    return f"bench: {where}: step {step}/{steps}, eta {eta}"


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0  # not written yet, or a line being written


def _run_with_progress(command: list[str], log: Path, where: str, steps: int) -> int:
    """Run one training job with its output in `log`; print a progress line whenever it logs a step."""
    metrics = log.parent / "metrics.jsonl"
    started, shown = time.monotonic(), 0
    # A killed bench takes its sub-run along (whose workers follow their launcher: env/lifeline.py).
    death = signal_when_parent_dies(signal.SIGKILL)
    with (
        open(log, "w") as handle,
        subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=death) as job,
    ):
        while True:
            try:
                code = job.wait(timeout=PROGRESS_POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            step = _last_step(metrics)
            if step > shown:
                shown = step
                print(progress_line(where, step, steps, time.monotonic() - started), flush=True)
            if code is not None:
                return code


def run_count(plan: Plan, n: int, repeat: int = 1) -> dict[str, Any]:
    """One training job on n workers; its summary.json with its steady "windows", or a RunFailed naming its log."""
    run_dir = run_dir_of(plan, n, repeat)
    run_dir.mkdir(parents=True)
    log = run_dir / "launch.log"
    where = f"{counted(n, plan.unit)} (run {repeat} of {plan.repeats})"
    print(
        f"bench: running {where}, global batch {n * plan.cfg.train.micro_batch * plan.cfg.train.accum} (log: {log})",
        flush=True,
    )
    code = _run_with_progress(launch_command(plan, n, repeat), log, where, plan.steps)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if code != 0 or summary is None or summary.get("stopped_early") or not summary.get("samples_per_sec"):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RunFailed(n, code or 1, lines[-1] if lines else "no output", log)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # throughput runs: their weights are not wanted
    print(
        f"bench: {where}: {summary['samples_per_sec']:,.1f} samples/s, {summary['step_ms']:.1f} ms per step",
        flush=True,
    )
    return summary | {"windows": steady_windows(run_dir)}


def run_all(plan: Plan) -> dict[int, dict[str, Any]]:
    """Every count, --repeats times, interleaved; per count: the first run's summary with every run's windows."""
    summaries: dict[int, dict[str, Any]] = {}
    for repeat in range(1, plan.repeats + 1):
        for n in plan.counts:
            summary = run_count(plan, n, repeat)
            if n in summaries:
                summaries[n]["windows"] += summary["windows"]
            else:
                summaries[n] = summary
    return summaries


class RunFailed(RuntimeError):
    def __init__(self, n: int, code: int, last_line: str, log: Path) -> None:
        super().__init__(f"the run on {n} worker(s) failed (exit {code}): {last_line} (full log: {log})")
        self.code = code


def model_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what is computed (the model, the sequence length), not how it is run."""
    return sorted(item.replace(" ", "") for item in overrides if item.startswith(("model.", "data.seq_len=")))


def workload_of(plan: Plan, summary: dict[str, Any]) -> dict[str, Any]:
    t = plan.cfg.train
    return {
        "config": plan.cfg.name,
        "arch": plan.cfg.model.arch,
        "precision": summary["precision"],
        "strategy": summary["strategy"],
        "micro_batch": t.micro_batch,
        "accum": t.accum,
        "grad_compression": t.grad_compression,
        "model_overrides": model_overrides(plan.overrides),
        "data": "synthetic",
        "scaling": "weak",
    }


def build_bench(plan: Plan, summaries: dict[int, dict[str, Any]], bandwidth: Bandwidth, baseline: dict | None) -> dict:
    """Everything bench.json holds, from the runs' summaries; pure apart from counting parameters."""
    from train.flops import count_params

    one = summaries[1]
    workload = workload_of(plan, one)
    comm = CommPlan.for_run(
        count_params(plan.cfg.model).total, one["strategy"], one["precision"], plan.cfg.train.grad_compression,
        plan.cfg.train.accum,
    )  # fmt: skip
    rows = measured_rows(summaries)
    findings = noise_findings(rows, plan.unit)
    add_prediction(rows, comm, bandwidth.busbw_gbps)
    judged = None
    if baseline is not None:
        judged = add_baseline(rows, baseline, incomparable_reasons(one["device"], workload, baseline))
    return {
        "schema": SCHEMA,
        "kind": "bench",
        "config": plan.cfg.name,
        "device": one["device"],
        "unit": plan.unit,
        "steps": plan.steps,
        "workload": workload,
        "prediction": {
            "plan": comm.describe(),
            "params": comm.params,
            "bandwidth": {
                "busbw_gbps": bandwidth.busbw_gbps,
                "source": bandwidth.source,
                "measured": bandwidth.measured,
            },
            "overlap": "none (upper bound on step time)",
        },
        "columns": [{"key": c.key, "header": c.header, "kind": c.kind} for c in columns_for(judged is not None)],
        "rows": rows,
        "noise": {
            "bound": bool(findings),
            "findings": findings,
            "limit": NOISE_SPREAD,
            "repeats": plan.repeats,
            "measurements": min(row["measurements"] for row in rows),
        },
        "baseline": judged,
        "runs": {str(n): str(plan.run_dir / f"n{n}") for n in summaries},
    }


# ---- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), help="largest count: runs 1..GPUS (default: every GPU, or 1 CPU process)"
    )
    parser.add_argument("--counts", default="", help="comma list of counts instead of 1..GPUS, e.g. 1,2,4")
    parser.add_argument("--config", default="", help="config name or .yaml (default: the baseline's, or small/tiny)")
    parser.add_argument(
        "--steps", type=count_arg("--steps"), default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--repeats", type=count_arg("--repeats"), default=DEFAULT_REPEATS, help=f"runs per count, interleaved (default {DEFAULT_REPEATS})"
    )
    parser.add_argument("--run-dir", default="", help="default runs/bench-CONFIG-TIMESTAMP")
    parser.add_argument("--baseline", default="", help="a shipped name (train/baselines/) or a previous bench.json")
    parser.add_argument("--nccl-json", default="", help="busbw for the prediction from make nccl-test JSON=...")
    parser.add_argument("--link", default="", help=f"assumed link instead: {', '.join(LINK_ASSUMPTIONS)}")
    for flag in LAUNCH_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default="")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.image_size=160")
    return parser


def flag_values(args: argparse.Namespace, baseline: dict | None, device_type: str) -> tuple[str, dict[str, str]]:
    """The config and the train.launch flags (micro_batch, ...) to run: as given, else the baseline's workload
    on GPUs (its config and micro-batch), else train.launch's default config."""
    values = {flag: getattr(args, flag) for flag in LAUNCH_FLAGS if getattr(args, flag)}
    workload = (baseline or {}).get("workload", {})
    if args.config:
        return args.config, values
    if device_type == "cuda" and "config" in workload:
        if "micro_batch" in workload:
            values.setdefault("micro_batch", str(workload["micro_batch"]))
        print(
            f"bench: workload from baseline {baseline['name']}: config {workload['config']}, "
            f"micro-batch {values.get('micro_batch', 'as configured')}"
        )
        return workload["config"], values
    return ("small" if device_type == "cuda" else "tiny"), values


def make_plan(args: argparse.Namespace, baseline: dict | None, cuda_gpus: int) -> Plan:
    device_type = "cuda" if cuda_gpus else "cpu"
    unit = "GPU" if cuda_gpus else "CPU process"
    gpus = check_workers(args.gpus, cuda_gpus, "--gpus")
    counts = parse_counts(args.counts, gpus, unit)
    if args.steps < 2:
        raise BenchError(f"--steps {args.steps} must be at least 2 (the first logged window is warm-up)")
    config, values = flag_values(args, baseline, device_type)
    as_overrides = [f"train.{flag}={value}" for flag, value in values.items()]
    cfg = load_config(config, [*args.overrides, *as_overrides, f"train.steps={args.steps}", "data.source=synthetic"])
    run_dir = Path(args.run_dir or f"runs/bench-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    taken = [run_dir / f"n{n}" for n in counts if (run_dir / f"n{n}").exists()]  # a repeat's runs go under n{n}/
    if taken:
        raise BenchError(f"{taken[0]} already holds a run; choose a new RUN_DIR")
    flags = [item for flag, value in values.items() for item in (f"--{flag.replace('_', '-')}", value)]
    if args.repeats < 1:
        raise BenchError(f"--repeats {args.repeats} must be at least 1")
    return Plan(cfg, counts, args.steps, run_dir, flags, list(args.overrides), device_type, args.repeats)


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        args = build_parser().parse_args(argv)
        baseline = load_baseline(resolve_baseline(args.baseline)) if args.baseline else None
        plan = make_plan(args, baseline, cuda_gpus)
        bandwidth = resolve_bandwidth(args.nccl_json, args.link, plan.device_type, plan.counts[-1])
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create RUN_DIR ({exc.strerror}); choose a writable RUN_DIR") from None
    RunDirLock(plan.run_dir).acquire()  # one bench per RUN_DIR (env/runlock.py), held until this process exits
    if plan.device_type == "cpu":
        print(
            "bench: no GPU: counts are CPU processes on gloo (a testing mode): MFU is null, the processes share "
            "the CPU's cores (so exposed comm includes lost compute), and no figure says anything about GPUs",
            flush=True,
        )
    from env.manifest import write_manifest

    write_manifest(
        plan.run_dir,
        kind="bench",
        config=plan.cfg.to_dict(),
        extra={
            "counts": plan.counts,
            "steps": plan.steps,
            "baseline": args.baseline or None,
            "repeats": plan.repeats,
            "busbw": bandwidth.source,
        },
    )
    try:
        summaries = run_all(plan)
    except RunFailed as exc:
        print(f"torchrig: bench: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"torchrig: bench: interrupted; the finished runs are in {plan.run_dir}", file=sys.stderr)
        return 130
    bench = build_bench(plan, summaries, bandwidth, baseline)
    print("\n".join(["", *write_outputs(plan.run_dir, bench, columns_for(baseline is not None))]), flush=True)
    return NOISE_EXIT if bench["noise"]["bound"] else 0


if __name__ == "__main__":
    run_cli("bench", main)
