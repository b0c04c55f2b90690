"""The report: everything bench.json holds, and the table as console text, CSV, Markdown and a PNG."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.bench import counted, plural
from train.bench.bandwidth import Bandwidth
from train.bench.baseline import NOT_COMPARABLE, TOLERANCE, add_baseline, incomparable_reasons
from train.bench.comm import CommPlan, add_prediction
from train.bench.measure import NOISE_EXIT, NOISE_SPREAD, Plan, measured_rows, noise_findings
from train.models import count_params

SCHEMA = 1


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
