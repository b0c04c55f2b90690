"""Hostile input through `make ... RUNTIME=local`: every value reaches Python byte for byte or is one line.

Each case is a real make invocation, as a user types it: make variables are never expanded or run
(a `$(shell ...)` stays text), a bad value is `torchrig <tool>: <line>` and exit 2, never a traceback
or a hang.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers.make import make as user_make
from tests.helpers.make import needs_make, pinned_venv, user_environment
from tests.helpers.paths import ROOT

pytestmark = [needs_make, pinned_venv]
# Values that a shell, make or a recipe would evaluate, split or drop if anything expanded them.
HOSTILE = [
    "$(shell touch {canary})",
    "a$bc",
    "$$x",
    "`touch {canary}`",
    "$(touch {canary})",
    'it\'s "quoted"',
    "two  spaces and a trailing one ",
    "back\\slash\\\\ and \\$x",
    "semi;colon|pipe&amp>gt<lt#hash%pct*star",
    "ünïcödé",
]
SMALL = "model.max_seq_len=32 data.seq_len=32 model.n_layers=1 model.dim=32 train.log_every=1"


# make as a user types it, with only the directory lines left out (not -s, which silences make's own notes too).
make = functools.partial(user_make, silent=False)


def ours(result: subprocess.CompletedProcess, tool: str) -> str:
    """The one `torchrig <tool>:` error line, after checking it is the only one and the exit is 2."""
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"torchrig {tool}: ")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def a_run(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "manifest.json").write_text(json.dumps({"kind": "train", "packages": {"list": []}}))
    return where


@pytest.mark.parametrize("name", HOSTILE)
def test_a_value_reaches_python_byte_for_byte_and_nothing_in_it_runs(tmp_path: Path, name: str) -> None:
    canary = tmp_path / "canary"
    run = a_run(tmp_path / name.format(canary=canary))
    result = make("compare", f"A={run}", f"B={run}")
    assert result.returncode == 0, result.stderr
    assert f"A: {run / 'manifest.json'}\n" in result.stdout and f"B: {run / 'manifest.json'}\n" in result.stdout
    assert not canary.exists()


@pytest.mark.slow
def test_a_training_run_dir_and_config_path_arrive_byte_for_byte(tmp_path: Path) -> None:
    canary = ROOT / f"canary-{os.getpid()}"  # a relative name: a path's '/' would split the directory names
    where = tmp_path / f"r $x `touch {canary.name}` $(touch {canary.name}) 'q' \"d\" \\ -x"
    where.mkdir()
    config = where / "my $cfg.yaml"
    config.write_text((ROOT / "train/configs/tiny.yaml").read_text())
    run_dir = where / f"-run $(shell touch {canary.name})"
    result = make(
        "train", f"CONFIG={config}", "GPUS=1", "STEPS=2", "MICRO_BATCH=2", f"RUN_DIR={run_dir}", f"ARGS={SMALL}"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert not canary.exists()


def test_a_newline_in_a_value_is_refused_and_never_splits_the_recipe(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    assert "A holds a newline" in ours(make("compare", f"A=x\ntouch {canary}", "B=y"), "make")
    ignoring = make("-i", "compare", f"A=x\ntouch {canary}", "B=y")  # -i: make would run a split-off line
    assert "torchrig make: A holds a newline" in ignoring.stderr and not canary.exists()


@pytest.mark.parametrize("target", ["lint", "test-current", "test-image", "lock"])
def test_script_targets_refuse_command_line_variables_without_expanding_them(tmp_path: Path, target: str) -> None:
    canary = tmp_path / "canary"
    result = subprocess.run(
        ["make", target, f"DOCKER=$(shell touch {canary})"], cwd=ROOT, capture_output=True, text=True,
        env=user_environment(),
    )  # fmt: skip
    assert result.returncode == 2 and f"make {target} takes no variables (DOCKER)" in result.stderr
    assert not canary.exists()


def test_variables_only_in_the_environment_are_ignored_and_named(tmp_path: Path) -> None:
    run = a_run(tmp_path / "run")
    result = make("compare", f"B={run}", env={"A": str(run), "SEED": "$(shell touch x)"})
    assert "torchrig: ignoring A, SEED from the shell's environment" in result.stderr
    assert "the following arguments are required: B" in ours(result, "compare")  # A from the shell did not count


def test_a_dash_value_is_a_path_not_an_option(tmp_path: Path) -> None:
    line = ours(make("compare", "A=-h", "B=--version"), "compare")
    assert "-h does not exist" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "GPUS=²"], "GPUS '²' is not a whole number written in the digits 0-9"),
        (["train", "STEPS=١٠"], "STEPS '١٠' is not a whole number"),
        (["train", "MAX_RESTARTS=abc"], "MAX_RESTARTS 'abc' is not a whole number"),
        (["train", "SEED=３"], "SEED '３' is not a whole number"),
        (["nccl-test", "MIN_BUSBW=nan"], "MIN_BUSBW 'nan' is not a finite decimal number"),
        (["train", "ARGS=name='unbalanced"], "no closing quotation"),
        (["train", "ARGS=--gpus -1"], "ARGS takes key=value config overrides only"),
        (["train", "GPUS=1", "ARGS=train.steps=2 --run-dir=/"], "ARGS holds '--run-dir=/'"),
        (["train", "NO_SUCH=1"], "NO_SUCH is not a torchrig make variable"),
        (["compare", "GPUS=2"], "make compare does not take GPUS"),
    ],
)
def test_bad_make_values_are_one_line_before_anything_starts(args: list[str], expected: str) -> None:
    assert expected in ours(make(*args), "make")


def _train(tmp_path: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return make("train", "CONFIG=tiny", "GPUS=1", "MICRO_BATCH=2", f"RUN_DIR={tmp_path / 'run'}", *extra, **kw)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("name=../../../tmp/x", "name='../../../tmp/x' is not a plain name"),
        ("name=.hidden", "is not a plain name"),
        ("train.lr=nan", "train.lr=nan is not a finite number"),
        ("train.lr=inf", "train.lr=inf is not a finite number"),
        ("train.first_timeout_s=0", "train.first_timeout_s=0.0 must be more than 0 seconds"),
        ("train.timeout_s=-5", "train.timeout_s=-5.0 must be more than 0 seconds"),
        ("model.dim=100000000", "GiB (16 bytes each)"),
        ("model.n_layers=1000000000", "exceeds 4096"),
        ("model.n_heads=٤", "model.n_heads='٤' is not a valid int"),
    ],
)
def test_bad_overrides_are_one_line_before_allocating(tmp_path: Path, args: str, expected: str) -> None:
    assert expected in ours(_train(tmp_path, f"ARGS={args}"), "train")


def test_a_run_name_names_a_directory_under_runs() -> None:
    outside = ROOT.parent.parent / "tmp"
    before = set(outside.glob("x-*")) if outside.is_dir() else set()
    assert "is not a plain name" in ours(make("train", "CONFIG=tiny", "ARGS=name=../../../tmp/x"), "train")
    assert (set(outside.glob("x-*")) if outside.is_dir() else set()) == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"train:\n  lr: \xff\xfe\n", "not UTF-8 text"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 12)) + "  " * 12 + "v: 1\n").encode(), "levels"),
        (b"train:\n  lr: 1\n  steps: 2\n  lr: 3\n", "key 'lr' is given twice (lines 2 and 4)"),
        (
            b'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
            + b"".join(
                f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n".encode()
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            )
            + b"train:\n  precision: *i\n",
            "values once its aliases are expanded",
        ),
    ],
    ids=["binary", "deep-flow", "deep-blocks", "duplicate-key", "billion-laughs"],
)
def test_a_hostile_config_file_is_one_line(tmp_path: Path, text: bytes, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    assert expected in ours(make("train", f"CONFIG={config}", f"RUN_DIR={tmp_path / 'run'}"), "train")


def _bound_port() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server, server.getsockname()[1]


def test_a_multi_node_master_port_in_use_is_one_line(tmp_path: Path) -> None:
    server, port = _bound_port()
    with server:
        result = _train(tmp_path, "NNODES=2", "NODE_RANK=0", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}")
    assert f"MASTER_PORT {port} is already in use on this host" in ours(result, "train")


def test_a_node_without_its_master_says_what_it_waits_for_and_gives_up(tmp_path: Path) -> None:
    server, port = _bound_port()
    server.close()  # nothing listens there now
    result = _train(
        tmp_path, "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", "MASTER_WAIT=2"
    )
    assert f"waiting up to 2 s for the master (NODE_RANK=0) at 127.0.0.1:{port}" in result.stderr
    assert f"no master answered at 127.0.0.1:{port} within 2 s" in ours(result, "train")


def test_a_bad_node_flag_is_one_line_not_a_usage_text(tmp_path: Path) -> None:
    assert "--master-wait 0 must be at least 1" in ours(
        _train(tmp_path, "NNODES=2", "MASTER_ADDR=x", "MASTER_WAIT=0"), "train"
    )


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_can_run_the_venv() -> bool:
    """Permissions do not bite root: these cases run as nobody, which needs a venv it may execute."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run([*NOBODY, str(ROOT / ".venv/bin/python"), "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _nobody_can_run_the_venv(), reason="needs root, setpriv and a venv that nobody may run")
@pytest.mark.parametrize("case", ["unreadable-data", "unwritable-run-dir"])
def test_permission_problems_are_one_line(case: str) -> None:
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="torchrig-perm-"))  # pytest's tmp_path is private to root
    tmp_path.chmod(0o777)
    data = tmp_path / "corpus.txt"
    data.write_text("hello world " * 200)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o777)
    if case == "unreadable-data":
        data.chmod(0o000)
    else:
        run_dir.chmod(0o555)
    # The launcher itself, as nobody: make's recipe would first stat .venv, which may be root's here.
    command = [
        *NOBODY, str(ROOT / ".venv/bin/python"), "-m", "train.launch", "--gpus=1", "--config=tiny",
        f"--run-dir={run_dir}", "--", "data.source=files", f"data.path={data}",
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    try:
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**environ, "HOME": str(tmp_path)}
        )
    finally:
        data.chmod(0o600)
        run_dir.chmod(0o700)
        shutil.rmtree(tmp_path)
    expected = f"{data} cannot be read (Permission denied)" if case == "unreadable-data" else "is not writable"
    assert expected in ours(result, "train")


def _torch_version() -> tuple[int, int]:
    import torch

    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[return-value]


@pytest.mark.skipif(_torch_version() >= (2, 6), reason="FSDP2 runs on CPU from torch 2.6")
def test_fsdp_on_cpu_with_an_old_torch_says_what_it_needs(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "STRATEGY=fsdp on CPU needs torch >= 2.6" in ours(_train(tmp_path, "STRATEGY=fsdp"), "train")


def test_nccl_test_sizes_on_cpu_are_capped(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    line = ours(make("nccl-test", "GPUS=2", "SIZES=8:1G:2", f"RUN_DIR={tmp_path}"), "nccl-test")
    assert "on CPU (gloo) sizes are capped at 64M" in line


def _hostile_json(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.json"
    contents = {
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "nested": b'{"a":' * 100 + b"1" + b"}" * 100,
        "list": b"[1, 2, 3]",
        "bad-packages": b'{"packages": {"list": "torch==2.4"}}',
        "bad-rows": b'{"rows": [{"gpus": "one", "samples_per_sec": 1}]}',
        "bad-ops": b'{"ops": ["all_reduce"], "world_size": 2}',
        "nan-busbw": b'{"ops": {"all_reduce": {"large_busbw": NaN}}, "world_size": 2}',
    }[kind]
    path.write_bytes(contents)
    return path


@pytest.mark.parametrize("kind", ["binary", "deep", "nested", "list", "bad-packages"])
def test_compare_of_a_hostile_json_file_is_one_line(tmp_path: Path, kind: str) -> None:
    bad = _hostile_json(tmp_path, kind)
    run = a_run(tmp_path / "run")
    ours(make("compare", f"A={bad}", f"B={run}"), "compare")


@pytest.mark.parametrize(
    ("variable", "kind"),
    [
        ("BASELINE", "binary"),
        ("BASELINE", "deep"),
        ("BASELINE", "bad-rows"),
        ("NCCL_JSON", "binary"),
        ("NCCL_JSON", "nested"),
        ("NCCL_JSON", "bad-ops"),
        ("NCCL_JSON", "nan-busbw"),
    ],
)
def test_bench_of_a_hostile_json_file_is_one_line(tmp_path: Path, variable: str, kind: str) -> None:
    bad = _hostile_json(tmp_path, kind)
    line = ours(make("bench", "GPUS=2", f"{variable}={bad}", f"RUN_DIR={tmp_path / 'bench'}"), "bench")
    assert str(bad) in line and not (tmp_path / "bench").exists()


def test_every_make_variable_is_in_the_one_table_and_the_help_lines() -> None:
    """The Makefile's help line of each dispatched target lists exactly the variables the table gives it."""
    from env.rig.runtime import COMMON_VARS, MAKE_VARS, OWN_TARGETS, TARGETS, target_variables

    helps = dict(re.findall(r"^([a-z-]+): ## (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for name in [*TARGETS, *OWN_TARGETS]:
        listed = re.search(r"\(([^()]*)\)$", helps[name])
        words = {w.split("=")[0] for w in re.split(r"[ ,]+", listed[1]) if listed} if listed else set()
        in_help = {w for w in words if re.fullmatch(r"[A-Z][A-Z_]*", w)}
        assert in_help == set(target_variables(name)) - set(COMMON_VARS), name
    used = {v for name in [*TARGETS, *OWN_TARGETS] for v in target_variables(name)}
    assert used == set(MAKE_VARS)  # no variable in the table that no target takes


def test_the_launcher_and_bench_read_the_shorthands_from_the_table() -> None:
    from env.rig.runtime import MAKE_VARS
    from train import launch
    from train.bench import cli as bench

    shorthands = {name for name, var in MAKE_VARS.items() if var.config_key}
    assert {f"--{flag.replace('_', '-')}" for flag in launch.FLAG_KEYS} == {MAKE_VARS[n].flag for n in shorthands}
    assert set(bench.LAUNCH_FLAGS) == set(launch.FLAG_KEYS) - {"steps"}


def test_makeflags_quoting_round_trips() -> None:
    """The decoder of make's quote_for_env: blanks and backslashes escaped, `$` doubled."""
    from env.common.cli import UserError
    from env.rig.runtime import make_command_line

    assert make_command_line("") == {} and make_command_line("s") == {}
    flags = r"ks -j2 --jobserver-auth=3,4 -- B=x\ --\ C=1 A=$$$$(id)\\\ \`q\` E="
    assert make_command_line(flags) == {"B": "x -- C=1", "A": "$$(id)\\ `q`", "E": ""}
    with pytest.raises(UserError, match="without -e"):
        make_command_line("es -- $(MAKEOVERRIDES)")  # make -e leaves an unexpanded reference there
