"""`make compare A=run1 B=run2` / `python -m env.records.compare A B`: what differs between two runs.

A and B are run directories (holding manifest.json, and summary.json when the run finished)
or manifest paths. Printed: the manifest keys whose values differ (flattened, noisy keys such
as timestamps and temperatures left out), the package differences (added, removed, changed),
and every numeric figure both summaries have (val_loss and val_bpb among them), side by side
with the ratio B/A. Timing figures (step_ms, samples/s, tokens/s, mfu) are medians of logged steps:
their ratio is marked NOISE, with a line saying why, when either run's logged step times spread
beyond bench's rule (env/records/noise.py: ±10% around the median). For two training runs it also
draws one PNG overlaying both runs' training and validation loss and throughput
(env/records/plots.py): --plot PATH (make compare OUTPUT=…), by default A's run directory /
compare-<B's name>.png.
Exit status: 0 after printing, 2 when a path or its manifest is missing or unreadable, or when
OUTPUT cannot be written (its folder missing, or another file there).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.common.cli import ArgumentParser, UserError, load_json, run_cli
from env.common.readfile import read_regular
from env.records.noise import NOISE_SPREAD, spread
from env.records.plots import METRICS_NAME, PlotError, read_records, write_compare_plot

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"
# Keys left out: those that differ between any two runs without meaning anything (when, how
# warm, how full, which directory), and those shown another way.
SKIPPED_KEYS = (
    "created_*",
    "command",
    "packages.*",  # compared as a package list below
    "facts.environ.NCCL_*",  # shown under environment.*
    "facts.environ.TORCH_*",
    "facts.snapshot.gpus.*.temperature_c",
    "facts.snapshot.gpus.*.utilization_pct",
    "facts.snapshot.gpus.*.pcie_gen_current",  # idle downshift; the doctor judges links under load
    "facts.disk_free_bytes",
    "facts.run_dir",
    "facts.pcie_load",
)
VALUE_WIDTH = 40
# Summary figures that are timings (medians of logged steps): their ratio needs the noise rule.
TIMING_KEYS = ("step_ms", "samples_per_sec", "tokens_per_sec", "mfu")


class CompareError(UserError):
    """A path that is not a run: one line for the user."""


@dataclass
class Run:
    label: str
    manifest_path: Path
    manifest: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    fix = "give a run directory written by make train, nccl-test or bench"
    data = load_json(path, "file", fix, CompareError)
    if not isinstance(data, dict):
        raise CompareError(f"{path} holds no JSON object; {fix}")
    packages = data.get("packages", {})
    listed = packages.get("list", []) if isinstance(packages, dict) else None
    if not isinstance(listed, list) or not all(isinstance(line, str) for line in listed):
        raise CompareError(f"{path}: 'packages' is not an object with a list of name==version strings; {fix}")
    return data


def load_run(path_text: str) -> Run:
    path = Path(path_text)
    if not path.exists():
        raise CompareError(f"{path} does not exist; give a run directory or its manifest.json")
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.exists():
        raise CompareError(f"{path} has no {MANIFEST_NAME}; was it written by make train, nccl-test or bench?")
    summary_path = manifest_path.parent / SUMMARY_NAME
    summary = _read_json(summary_path) if summary_path.exists() else {}
    return Run(path_text, manifest_path, _read_json(manifest_path), summary)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': [1, {'c': 2}]}, 'd': {}} -> {'a.b.0': 1, 'a.b.1.c': 2}: an empty container adds no key."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in items:
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _skipped(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SKIPPED_KEYS)


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in A, value in B) for every flattened key that differs; a missing key reads as None."""
    flat_a, flat_b = flatten(a), flatten(b)
    keys = sorted((flat_a.keys() | flat_b.keys()), key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    return [(k, flat_a.get(k), flat_b.get(k)) for k in keys if not _skipped(k) and flat_a.get(k) != flat_b.get(k)]


@dataclass
class PackageDiff:
    added: list[str]  # "name==version" in B only
    removed: list[str]  # in A only
    changed: list[tuple[str, str, str]]  # (name, version in A, version in B)


def _versions(manifest: dict[str, Any]) -> dict[str, str]:
    lines = (manifest.get("packages") or {}).get("list") or []
    return dict(line.split("==", 1) for line in lines if "==" in line)


def diff_packages(a: dict[str, Any], b: dict[str, Any]) -> PackageDiff:
    va, vb = _versions(a), _versions(b)
    return PackageDiff(
        added=[f"{n}=={vb[n]}" for n in sorted(vb.keys() - va.keys())],
        removed=[f"{n}=={va[n]}" for n in sorted(va.keys() - vb.keys())],
        changed=[(n, va[n], vb[n]) for n in sorted(va.keys() & vb.keys()) if va[n] != vb[n]],
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_figures(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float, float, float | None]]:
    """(key, A, B, B/A) for every numeric figure both summaries have; the ratio is None when A is 0."""
    flat_a, flat_b = flatten(a), flatten(b)
    common = [k for k in flat_a if k in flat_b and _is_number(flat_a[k]) and _is_number(flat_b[k])]
    return [(k, flat_a[k], flat_b[k], flat_b[k] / flat_a[k] if flat_a[k] else None) for k in common]


def _show(value: Any) -> str:
    text = "-" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 1] + "…"


def _figure(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(a: Run, b: Run) -> str:
    lines = [f"A: {a.manifest_path}", f"B: {b.manifest_path}"]
    differences = diff_manifests(a.manifest, b.manifest)
    if differences:
        width = max(len(k) for k, _, _ in differences) + 2
        lines.append(f"\nmanifests differ in {len(differences)} key(s):")
        lines.append(f"  {'KEY':<{width}}{'A':<{VALUE_WIDTH + 2}}B")
        lines += [f"  {k:<{width}}{_show(va):<{VALUE_WIDTH + 2}}{_show(vb)}" for k, va, vb in differences]
    else:
        lines.append("\nmanifests: no differences (timestamps, temperatures and free disk left out)")
    packages = diff_packages(a.manifest, b.manifest)
    if packages.added or packages.removed or packages.changed:
        lines.append(
            f"\npackages: {len(packages.added)} added, {len(packages.removed)} removed, {len(packages.changed)} changed"
        )
        lines += [f"  + {p}" for p in packages.added]
        lines += [f"  - {p}" for p in packages.removed]
        lines += [f"  ~ {name} {va} -> {vb}" for name, va, vb in packages.changed]
    else:
        lines.append("\npackages: the same")
    figures = compare_figures(a.summary, b.summary)
    if figures:
        noise = timing_noise(a, b) if any(key in TIMING_KEYS for key, *_ in figures) else []
        width = max(len(k) for k, *_ in figures) + 2
        lines.append(f"\nfigures ({SUMMARY_NAME}):")
        lines.append(f"  {'KEY':<{width}}{'A':>14}{'B':>14}{'B/A':>9}")
        for key, va, vb, ratio in figures:
            shown = f"{ratio:.3f}" if ratio is not None else "-"
            mark = "  NOISE" if noise and key in TIMING_KEYS else ""
            lines.append(f"  {key:<{width}}{_figure(va):>14}{_figure(vb):>14}{shown:>9}{mark}")
        if noise:
            lines.append(
                f"\n  NOISE: {'; '.join(noise)}: the timing ratios could move as much on a rerun (bench's rule: more "
                f"than ±{NOISE_SPREAD:.0%} around the median); compare runs made on an idle machine"
            )
    else:
        missing = [r.label for r in (a, b) if not r.summary]
        why = f"no {SUMMARY_NAME} in {', '.join(missing)}" if missing else "no numeric figure in both"
        lines.append(f"\nfigures: none to compare ({why})")
    return "\n".join(lines)


def timing_noise(a: Run, b: Run) -> list[str]:
    """Why the two runs' timings cannot carry a ratio, one phrase per run, by bench's rule; empty when they can
    (or when a run logged no step times to judge them by: bench, too, takes a single figure as it is)."""
    found = []
    for label, run in (("A", a), ("B", b)):
        try:
            records = read_records(run.manifest_path.parent)
        except PlotError:
            continue
        steady = records[len(records) // 10 :]  # the first tenth holds the warm-up, as the summary's medians skip it
        times = [r["step_ms"] for r in steady if isinstance(r.get("step_ms"), (int, float)) and r["step_ms"] > 0]
        measured = spread(times)
        if measured is not None and measured > NOISE_SPREAD:
            found.append(f"{label}'s step times spread ±{measured:.0%} over {len(times)} logged steps")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m env.records.compare", description="Compare two runs.")
    parser.add_argument("a", metavar="A", help="run directory or manifest.json of the first run")
    parser.add_argument("b", metavar="B", help="run directory or manifest.json of the second run")
    parser.add_argument(
        "--output", "--plot", dest="plot", default="", help="where the overlay PNG goes (default: in A's run directory)"
    )
    args = parser.parse_args(argv)
    runs = load_run(args.a), load_run(args.b)
    print(render(*runs))
    print(overlay(*runs, args.plot))
    return 0


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PLOT_BYTES = 64 * 2**20  # an overlay is well under a MiB


def check_plot_path(out: Path) -> None:
    """OUTPUT is a .png, and an existing file there must be a PNG (an earlier overlay): nothing else is replaced."""
    if out.suffix.lower() != ".png":
        raise CompareError(f"OUTPUT={out} does not end in .png; name the overlay PNG, e.g. OUTPUT=compare.png")
    if not out.parent.is_dir():
        raise CompareError(f"OUTPUT={out}: its folder {out.parent} does not exist; create it or choose another OUTPUT")
    if out.is_symlink() or not out.exists():
        return  # a link is replaced, never written through (env.common.atomic)
    head = read_regular(out, MAX_PLOT_BYTES)  # the bounded reader: a FIFO there is refused, never waited on
    if head is None or head[: len(PNG_MAGIC)] != PNG_MAGIC:
        raise CompareError(f"OUTPUT={out} exists and is not a PNG; it is left alone: choose another OUTPUT")


def overlay(a: Run, b: Run, plot: str) -> str:
    """Draw the overlay PNG of two training runs; the line that says where it went, or why not."""
    dirs = a.manifest_path.parent, b.manifest_path.parent
    if not all((d / METRICS_NAME).is_file() for d in dirs):
        return "\nplot: none (only training runs, with a metrics.jsonl, are drawn)"
    out = Path(plot) if plot else dirs[0] / f"compare-{dirs[1].resolve().name}.png"
    check_plot_path(out)
    try:
        write_compare_plot(dirs[0], dirs[1], out)
    except PlotError as exc:  # nothing to draw (no records, no matplotlib): the comparison above stands
        return f"\nplot: none ({exc})"
    except OSError as exc:  # the OUTPUT asked for cannot be written: that is a failure, not a note
        raise CompareError(f"cannot write OUTPUT={out} ({exc.strerror}); choose a writable OUTPUT") from None
    return f"\nplot: {out} (A and B overlaid: loss against step and tokens, validation dashed, throughput)"


if __name__ == "__main__":
    run_cli("compare", main)
