"""Pictures of runs: RUN_DIR/loss.png at the end of a run, and `make compare`'s overlay of two runs.

Three panels, read from RUN_DIR/metrics.jsonl (the whole run, across resumes; a step logged twice
counts once, the later record winning): training and validation loss against the step, the same
against the tokens seen, and the throughput against the step. Axes are autoscaled with a margin,
so no measured point is clipped. Here, in env/, because `make compare` (env/records/compare.py) draws it
too, and env never imports train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from env.common.atomic import replace_atomically
from env.common.readfile import ReadRefused, read_bounded

METRICS_NAME = "metrics.jsonl"
METRICS_LIMIT = 1 << 30  # far above what a run writes (train/rundir.py reads it with the same bound)
LOSS_PLOT_NAME = "loss.png"
# (record key for x, axis label) of the two loss panels
LOSS_AXES = (("step", "optimizer step"), ("tokens", "tokens seen"))
Series = dict[str, tuple[list[float], list[float]]]
# The training figure is the objective, which adds model.mtp_weight x the MTP loss to the next-token
# loss; validation is the next-token loss alone: the labels say so, since the curves sit apart.
TRAIN_LABEL = "training objective (next token + MTP)"
NEXT_TOKEN_LABEL = "training loss (next token only)"
VAL_LABEL = "validation loss (next token)"


class PlotError(Exception):
    """No picture could be drawn (no records, no matplotlib): one line saying why."""


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's step records in step order, one per step (the last one logged for it)."""
    path = Path(run_dir) / METRICS_NAME
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = read_bounded(path, METRICS_LIMIT).decode(errors="replace").splitlines()
    except ReadRefused as exc:
        raise PlotError(f"{path} {exc.reason}") from None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    if not by_step:
        raise PlotError(f"{path} holds no step records")
    return [by_step[step] for step in sorted(by_step)]


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if _finite(r.get(x)) and _finite(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed (it is in requirements.txt: make setup)") from None
    return plt


def _throughput_key(records: list[dict[str, Any]]) -> tuple[str, str]:
    if any(_finite(r.get("tokens_per_sec")) for r in records):
        return "tokens_per_sec", "tokens/s (all ranks)"
    return "samples_per_sec", "samples/s (all ranks)"


def _literal(text: str) -> str:
    """Text matplotlib shows as written: a run named d$$e is not mathtext (an unpaired '$' is a parse error)."""
    return text.replace("$", r"\$")


def _draw(runs: list[tuple[str, list[dict[str, Any]]]], out: Path, title: str) -> Series:
    """Draw the three panels for each (label, records); returns what was drawn, line label -> (x, y)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    drawn: Series = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, records) in enumerate(runs):
        color = colors[index % len(colors)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        for ax, (x, _) in zip(axes[:2], LOSS_AXES, strict=True):
            lines = (
                ("loss", TRAIN_LABEL, "-"),
                ("next_token_loss", NEXT_TOKEN_LABEL, ":"),
                ("val_loss", VAL_LABEL, "--"),
            )
            for key, name, style in lines:
                xs, ys = _points(records, x, key)
                if xs:
                    line_label = f"{prefix}{name}"
                    marker = "o" if key == "val_loss" else None
                    ax.plot(xs, ys, style, color=color, marker=marker, label=_literal(line_label))
                    drawn[f"{line_label} vs {x}"] = (xs, ys)
        key, _ = _throughput_key(records)
        xs, ys = _points(records, "step", key)
        if xs:
            axes[2].plot(xs, ys, "-", color=color, label=_literal(f"{prefix}{key.replace('_per_sec', '/s')}"))
            drawn[f"{prefix}{key}"] = (xs, ys)
    for ax, (_, xlabel) in zip(axes[:2], LOSS_AXES, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats per token)")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel(_throughput_key(runs[0][1])[1])
    for ax in axes:
        ax.margins(0.05)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    axes[0].set_title("loss against step")
    axes[1].set_title("loss against tokens seen")
    axes[2].set_title("throughput")
    figure.suptitle(_literal(title))
    replace_atomically(out, lambda f: figure.savefig(f, format="png", dpi=100), "wb")
    plt.close(figure)
    return drawn


def write_loss_plot(run_dir: Path) -> Series:
    """RUN_DIR/loss.png from RUN_DIR/metrics.jsonl; returns the series drawn."""
    run_dir = Path(run_dir)
    return _draw([(run_dir.name, read_records(run_dir))], run_dir / LOSS_PLOT_NAME, f"run {run_dir.name}")


def write_compare_plot(a: Path, b: Path, out: Path, labels: tuple[str, str] = ("A", "B")) -> Series:
    """One picture overlaying runs A and B (training solid, validation dashed); returns the series drawn."""
    runs = [
        (f"{label} {Path(path).name}", read_records(Path(path))) for label, path in zip(labels, (a, b), strict=True)
    ]
    return _draw(runs, Path(out), f"A = {Path(a).name}, B = {Path(b).name}")
