"""`make doctor` / `python -m env.machine.doctor`: is this box healthy for the rig?

All facts are gathered first into one `Facts` (gather_facts), then the checks in
env/machine/checks.py (a table of pure functions) judge them. The report is a table of
status, check and evidence, with the fix under each row that is not OK.

    python -m env.machine.doctor [--json PATH] [--gpus N] [--run-dir DIR] [--no-load]

Exit status: 0 when no check FAILs, 1 when one does, 2 for bad input.

--json PATH writes a machine-readable report with a stable schema:

    {"schema": 1,
     "worst": "OK" | "WARN" | "FAIL",
     "checks": [{"name": str, "status": "OK" | "WARN" | "FAIL", "evidence": str, "fix": str}, ...],
     "facts": {...}}        # Facts.to_dict(): what the checks were given

Only "facts" may grow new keys within schema 1.

The facts and how they are gathered live in env/machine/facts.py; the checks in env/machine/checks.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from env.common.atomic import write_text_atomically
from env.common.cli import ArgumentParser, UserError, count_arg, run_cli
from env.machine.checks import CHECKS, Outcome, Status, run_checks, worst
from env.machine.facts import Facts, gather_facts

SCHEMA = 1


def exit_code(outcomes: list[Outcome]) -> int:
    return 1 if worst([o.status for o in outcomes]) is Status.FAIL else 0


def report_dict(facts: Facts, outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "worst": worst([o.status for o in outcomes]).value,
        "checks": [{"name": o.name, "status": o.status.value, "evidence": o.evidence, "fix": o.fix} for o in outcomes],
        "facts": facts.to_dict(),
    }


def render_report(facts: Facts, outcomes: list[Outcome]) -> str:
    counts = {s: sum(o.status is s for o in outcomes) for s in Status}
    lines = [f"torchrig doctor: {len(outcomes)} checks, " + ", ".join(f"{n} {s.value}" for s, n in counts.items())]
    if not facts.snapshot.gpus:
        why = facts.snapshot.error or "NVML sees no GPU"
        lines.append(f"no GPU here ({why}): GPU checks are WARN; a CPU-only machine is a valid place to run")
    width = max(len(o.name) for o in outcomes) + 2
    lines.append(f"{'STATUS':<6}  {'CHECK':<{width}}EVIDENCE")
    for o in outcomes:
        lines.append(f"{o.status.value:<6}  {o.name:<{width}}{o.evidence}")
        if o.status is not Status.OK and o.fix:
            lines.append(f"{'':<6}  {'':<{width}}fix: {o.fix}")
    result = worst([o.status for o in outcomes])
    lines.append(f"result: {result.value} (exit {exit_code(outcomes)})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m env.machine.doctor", description="Check this box for the rig.")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON (schema 1) here")
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), metavar="N", help="GPUs (or CPU processes) the runs will use"
    )
    parser.add_argument("--run-dir", default="runs", metavar="DIR", help="where runs and checkpoints go (disk check)")
    parser.add_argument(
        "--no-load",
        action="store_true",
        help="no GPU work: read PCIe links idle, decide P2P from NVML without peer copies",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, facts: Facts | None = None) -> int:
    """Run the doctor; `facts` replaces gathering (tests inject recorded facts)."""
    args = parse_args(argv)
    if facts is None:
        facts = gather_facts(args.run_dir, gpus_requested=args.gpus, gpu_load=not args.no_load)
    outcomes = run_checks(facts, CHECKS)
    print(render_report(facts, outcomes), flush=True)
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(report_dict(facts, outcomes), indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write --json {path}: {exc.strerror}; choose a writable path") from None
    return exit_code(outcomes)


if __name__ == "__main__":
    run_cli("doctor", main)
