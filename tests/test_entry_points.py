"""Every `python -m` entry point: a user error, from argparse or from the tool, is one line and exit 2.

The entry points are found by scanning env/ and train/ for a `__main__` block, so a new one that is
not in ENTRY_POINTS fails the first test until it is given a row here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT

# module -> (the prefix of its error line, arguments that are a domain error of that tool)
ENTRY_POINTS: dict[str, tuple[str, list[str]]] = {
    "env.rig.runtime": ("torchrig make: ", ["train", "RUNTIME=podman"]),
    "env.rig.console": ("torchrig console: ", ["trian"]),
    "env.records.compare": ("torchrig compare: ", ["--", "-h", "/no/such/run"]),
    "env.machine.doctor": ("torchrig doctor: ", ["--gpus", "١"]),
    "env.rig.docker": ("torchrig docker: ", ["run"]),
    "env.rig.profiles": ("torchrig profiles: ", ["show", "9.9"]),
    "env.nccl.launch": ("torchrig nccl-test: ", ["--dtype", "int8"]),
    "env.nccl.worker": ("torchrig nccl-test: ", ["--dtype", "int8"]),
    "train.launch": ("torchrig train: ", ["--gpus", "1", "--config", "nope"]),
    # Started by the launcher under torchrun: rank 0 says it, in the watchdog's and trainer's prefix.
    "train.worker": ("torchrig: ", ["--config", "nope"]),
    "train.bench": ("torchrig bench: ", ["--counts", "2,3"]),
    "train.prepare": ("torchrig prepare: ", ["--input", "x.txt", "--output", "x.txt"]),
    "train.benchmarks.data_loader": ("torchrig data-loader: ", ["--config", "nope"]),
    "train.benchmarks.harness_overhead": ("torchrig harness-overhead: ", ["--config", "nope"]),
    "train.benchmarks.step_profile": ("torchrig step-profile: ", ["--steps", "0"]),
    "train.benchmarks.sample": ("torchrig sample-bench: ", ["--run-dir", "/no/such/run"]),
    "train.benchmarks.prepare": ("torchrig prepare-bench: ", ["--procs", "0"]),
    "train.benchmarks.moe": ("torchrig moe-benchmark: ", ["--tables", "nope"]),
    "train.eval": ("torchrig eval: ", ["--run-dir", "/no/such/run"]),
    "train.sample": ("torchrig sample: ", ["--run-dir", "/no/such/run"]),
    "train.export": ("torchrig export: ", ["--run-dir", "/no/such/run", "--output", "/no/such/out"]),
    "env.slurm.job": ("torchrig slurm: ", ["submit", "train", "NNODES=x"]),
    "train.config_keys": ("torchrig keys: ", ["--output", "/no/such/dir/config.md"]),
    "train.plan": ("torchrig plan: ", ["--vram", "0"]),
    "train.benchmarks.plan": ("torchrig plan-bench: ", ["--precisions", "fp64"]),
}
NOT_YET: set[str] = set()


def discovered() -> set[str]:
    modules = set()
    for path in [*ROOT.glob("env/**/*.py"), *ROOT.glob("train/**/*.py")]:
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.MULTILINE):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))  # a package runs as itself
    return modules


def test_every_entry_point_has_a_row() -> None:
    assert discovered() == set(ENTRY_POINTS)


def _cases() -> list:
    cases = []
    for module, (prefix, domain) in sorted(ENTRY_POINTS.items()):
        marks = [pytest.mark.xfail(strict=True, reason="converted on its own branch")] if module in NOT_YET else []
        misuse = ["train", "--no-such-flag"] if module == "env.rig.runtime" else ["--no-such-flag"]
        cases.append(pytest.param(module, prefix, misuse, id=f"{module}-misuse", marks=marks))
        cases.append(pytest.param(module, prefix, domain, id=f"{module}-domain", marks=marks))
    return cases


@pytest.mark.parametrize(("module", "prefix", "argv"), _cases())
def test_a_user_error_is_one_line_and_exit_2(module: str, prefix: str, argv: list[str], tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
