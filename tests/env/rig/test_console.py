"""The `torchrig` console script: each make target a subcommand, its variables flags, checked as make checks them.

The console replaces itself with the target's CLI (os.execve); here that call is recorded instead, so
each case shows what would run, or that nothing runs after a one-line refusal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from env.rig import console
from env.rig.runtime import COMMON_VARS, MAKE_VARS, OWN_TARGETS, TARGETS, build_argv
from tests.helpers.paths import ROOT

# A valid value of each kind of make variable, as make's command line and as the console's argument.
GOOD = {"count": "2", "real": "1.5", "text": "x y", "switch": "1"}
# A value each kind refuses, and the words its one-line message holds.
BAD = {"count": ("١", "is not a whole number"), "real": ("nan", "is not a finite decimal number")}


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The argv each os.execve would have run; no GPU is visible."""
    calls: list[list[str]] = []
    monkeypatch.setattr(console.os, "execve", lambda path, argv, env: calls.append([path, *argv[1:]]))
    monkeypatch.setattr(console, "visible_gpu_count", lambda: 0)
    return calls


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], execs: list[list[str]]) -> str:
    """The one line a refused command prints; nothing ran and the exit code is 2."""
    assert console.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and not execs, lines
    return lines[0]


def console_args(name: str, values: dict[str, str]) -> list[str]:
    """`torchrig NAME ...` giving these make variables."""
    target = TARGETS[name]
    args = [name]
    for var in target.variables:
        if var in values:
            args += [console.flag(var)] if MAKE_VARS[var].kind == "switch" else [console.flag(var), values[var]]
    for var in target.positional:
        args += ["train.seed=3", "name=a b"] if var == "ARGS" else [values[var]]
    return args


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_variable_reaches_the_cli_as_make_passes_it(
    name: str, execs: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    target = TARGETS[name]
    values = {var: GOOD[MAKE_VARS[var].kind] for var in (*target.variables, *target.positional)}
    if "ARGS" in values:
        values["ARGS"] = "train.seed=3 'name=a b'"  # make's ARGS is one shell-quoted string; here, separate words
    assert console.main(console_args(name, values)) == 0
    gpus = int(values["GPUS"]) if "GPUS" in target.variables else None
    make_argv = build_argv(target, values, gpus)
    assert execs == [[sys.executable, *make_argv[1:]]]
    assert make_argv[:3] == ["python", "-m", target.module]
    if "GPUS" in target.variables and target.workers:
        assert "no GPU visible: 2 CPU process(es) on gloo" in capsys.readouterr().err


def _bad_values() -> list:
    return [
        pytest.param(name, var, *BAD[MAKE_VARS[var].kind], id=f"{name}-{var}")
        for name, target in sorted(TARGETS.items())
        for var in target.variables
        if MAKE_VARS[var].kind in BAD
    ]


@pytest.mark.parametrize(("name", "var", "value", "problem"), _bad_values())
def test_a_bad_number_is_one_line_naming_the_flag(
    name: str, var: str, value: str, problem: str, execs: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused([name, console.flag(var), value], capsys, execs)
    assert line.startswith(f"torchrig {name}: {console.flag(var)} {value!r} {problem}"), line


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_control_character_is_refused(name: str, execs: list[list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    target = TARGETS[name]
    var = next(v for v in target.variables if MAKE_VARS[v].kind == "text")
    positionals = [GOOD["text"] for v in target.positional if v != "ARGS"]
    line = refused([name, console.flag(var), "a\nb", *positionals], capsys, execs)
    assert "control character" in line and line.startswith(f"torchrig {name}: "), line


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_help_lists_the_targets_variables(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        console.main([name, "--help"])
    assert exited.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    target = TARGETS[name]
    assert target.summary in flat
    for var in target.variables:
        assert re.search(rf"{console.flag(var)}(?: {var})? [^()]*\(make {var}\b", flat), var
    for var in target.positional:
        assert f"(make {var})" in flat, var


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_the_overview_lists_every_target_and_what_only_make_runs(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert console.main(argv) == 0
    out = capsys.readouterr().out
    for name, target in TARGETS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(target.summary)}$", out, re.MULTILINE), name
    assert all(name in out for name in console.MAKE_ONLY)


def _makefile_helps() -> dict[str, str]:
    return dict(re.findall(r"^([a-z-]+): ## (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_every_make_target_is_a_subcommand_or_refused() -> None:
    assert set(_makefile_helps()) - {"help"} == set(TARGETS) | set(console.MAKE_ONLY)
    assert set(OWN_TARGETS) <= set(console.MAKE_ONLY)
    assert not set(TARGETS) & set(console.MAKE_ONLY)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_summary_is_the_makefile_help_line(name: str) -> None:
    assert TARGETS[name].summary and _makefile_helps()[name].startswith(f"{TARGETS[name].summary} (")


@pytest.mark.parametrize("name", sorted(console.MAKE_ONLY))
def test_a_make_only_target_is_refused_naming_make(
    name: str, execs: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused([name], capsys, execs)
    assert line.startswith("torchrig console: ") and f"run `make {name}`" in line, line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], r"^torchrig console: give a target"),
        (["trian"], r"^torchrig console: 'trian' is not a torchrig target; did you mean train\?"),
        (["--gpus", "2"], r"^torchrig console: '--gpus' is not a torchrig target"),
    ]
    # make's runtime variables are make's: an installed torchrig runs in its own environment.
    + [
        (["train", f"--{v.lower()}", "x"], rf"^torchrig train: unrecognized arguments: --{v.lower()}")
        for v in COMMON_VARS
    ]
    + [
        (["train", "--st", "3"], r"^torchrig train: unrecognized arguments: --st;"),  # no abbreviations, as make
        (["train", "foo"], r"^torchrig train: 'foo' is not a key=value config override"),
        (["train", "--gpus", "9"], r"^torchrig train: --gpus 9: no GPU is visible, so it counts CPU processes"),
        (["train", "--gpus", "0"], r"^torchrig train: --gpus 0 must be at least 1"),
        (["eval", "--gpus", "-1"], r"^torchrig eval: --gpus '-1' is not a whole number"),
        (["compare", "a"], r"^torchrig compare: the following arguments are required: B"),
        (["prepare", "--force", "1"], r"^torchrig prepare: unrecognized arguments: 1"),
    ],
)
def test_misuse_is_one_line(
    argv: list[str], expected: str, execs: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert re.search(expected, refused(argv, capsys, execs))


def test_overrides_may_stand_between_the_flags_and_keep_their_spaces(execs: list[list[str]]) -> None:
    assert console.main(["train", "--steps", "2", "train.seed=3", "name=a b", "--gpus", "1", "steps=4"]) == 0
    [argv] = execs
    assert argv[argv.index("--") :] == ["--", "train.seed=3", "name=a b", "steps=4"]
    assert {"--gpus=1", "--steps=2"} <= set(argv[: argv.index("--")])


def test_gpus_is_checked_against_the_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, execs: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(console, "visible_gpu_count", lambda: 3)
    line = refused(["nccl-test", "--gpus", "4"], capsys, execs)
    assert line == "torchrig nccl-test: --gpus 4 but only 3 GPU(s) are visible; use 3 or fewer"
    assert console.main(["nccl-test", "--gpus", "3"]) == 0
    assert "--gpus=3" in execs[0] and "no GPU visible" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_targets_own_exit_code_reaches_the_shell(tmp_path: Path) -> None:
    """The doctor's FAIL is exit 1 here (make would say 2): a lock whose torch is not the installed one."""
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==0.0.1 \\\n    --hash=sha256:00\n")
    env = {**os.environ, "TORCHRIG_LOCK": str(lock)}
    command = [sys.executable, "-m", "env.rig.console", "doctor", "--json", str(tmp_path / "doctor.json")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "differs from the lock: torch" in done.stdout and (tmp_path / "doctor.json").exists()
