"""Measurement: one training job per count and repeat, its steady windows, progress lines while it trains, and
the median, spread and noise verdict of each point."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env.records.noise import NOISE_SPREAD  # the rig's one noise rule: ±10% around the median
from env.rig.lifeline import signal_when_parent_dies
from train.bench import counted
from train.config import RunConfig
from train.metrics import steady
from train.sinks.console import format_duration

LOG_WINDOWS = 8  # logged windows per run; the summary takes the median over the steady ones
DEFAULT_REPEATS = 2  # runs per count; with the logged windows of each, several measurements per point
NOISE_EXIT = 3  # the table is written, but its figures are noise-bound
PROGRESS_POLL_S = 2.0


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
        "train.eval_every=0",  # benchmarks measure the step, not the validation
        "data.source=synthetic",  # nor the data source
    ]  # fmt: skip


def steady_windows(run_dir: Path) -> list[dict[str, float]]:
    """samples/s and step ms of each steady logged window of a finished run (what its summary's medians are over)."""

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"samples_per_sec": r["samples_per_sec"], "step_ms": r["step_ms"]} for r in steady(rows)]


def progress_line(where: str, step: int, steps: int, elapsed_s: float) -> str:
    """bench: 2 CPU processes (run 1 of 2): step 10/40, eta 0m30s — the ETA from the run's mean step so far."""

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
    # A killed bench takes its sub-run along (whose workers follow their launcher: env/rig/lifeline.py).
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
