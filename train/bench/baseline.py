"""Baselines and verdicts: a previous bench.json or a shipped claim (train/baselines/NAME.json), each row
REPRODUCED, BETTER or REFUTED, and NOT COMPARABLE where the device or the workload differs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from env.common.cli import load_json
from env.machine.peaks import find_row
from train.bench import BenchError
from train.bench.comm import HALF_PRECISIONS

BASELINE_DIR = Path(__file__).parent.parent / "baselines"
TOLERANCE = 0.10  # a baseline is REPRODUCED within ±10% of its samples/s

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
    """The same GPU model: the same env/machine/peaks.py row where both have one, else the same name."""

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
