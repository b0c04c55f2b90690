"""nccl-test's options (env/nccl/options.py): size parsing, defaults by device, one-line usage errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from env.common.cli import CPU_DEFAULT_WORKERS, UserError
from env.nccl.collectives import COLLECTIVES
from env.nccl.options import parse_options, parse_sizes

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10


def test_sizes_follow_min_max_factor():
    sizes = parse_sizes("8:1G:2")
    assert sizes[0] == 8 and sizes[-1] == GiB and len(sizes) == 28
    assert all(b == 2 * a for a, b in itertools.pairwise(sizes))
    assert parse_sizes("1K:16K:4") == [KiB, 4 * KiB, 16 * KiB]
    assert parse_sizes("64M") == [64 * MiB]
    assert parse_sizes("1k:4kb") == [KiB, 2 * KiB, 4 * KiB]
    assert parse_sizes("8:100:4") == [8, 32]  # stops before passing max


@pytest.mark.parametrize("spec", ["8:1X:2", "abc", "0:1K", "-8:1K", "1.5M", "8:1G:1", "8:1G:x", "1:2:3:4", "8::2"])
def test_bad_sizes_are_usage_errors(spec: str):
    with pytest.raises(UserError, match="--sizes"):
        parse_sizes(spec)


def test_min_above_max_is_a_usage_error():
    with pytest.raises(UserError, match="larger than max"):
        parse_sizes("1G:8")


def test_options_defaults_depend_on_the_device():
    on_cpu = parse_options([], 0, in_worker=False)
    assert on_cpu.gpus == CPU_DEFAULT_WORKERS and on_cpu.sizes == parse_sizes("8:4M:4") and on_cpu.ops == ["all_reduce"]
    on_gpu = parse_options([], 3, in_worker=False)
    assert on_gpu.gpus == 3 and on_gpu.sizes[-1] == GiB
    assert parse_options(["--ops", "all"], 0, in_worker=False).ops == list(COLLECTIVES)
    assert parse_options(["--run-dir", "r"], 0, in_worker=False).json_path == Path("r") / "nccl_test.json"
    default = parse_options([], 0, in_worker=False)
    assert default.run_dir.parent == Path("runs") and default.json_path == default.run_dir / "nccl_test.json"


@pytest.mark.parametrize(
    ("argv", "cuda_gpus", "message"),
    [
        (["--ops", "all_reduce,gather"], 0, "unknown op 'gather'"),
        (["--dtype", "fp64"], 0, "--dtype fp64"),
        (["--gpus", "4"], 3, "only 3 GPU"),
        (["--gpus", "9"], 0, "at most 8"),
        (["--iters", "0"], 0, "--iters"),
        (["--sizes", "1G:1K"], 0, "larger than max"),
        (["--nnodes", "2"], 0, "--master-addr"),
        (["--frobnicate"], 0, "unrecognized"),
    ],
)
def test_bad_options_are_one_line_usage_errors(argv: list[str], cuda_gpus: int, message: str):
    with pytest.raises(UserError, match=message) as caught:
        parse_options(argv, cuda_gpus, in_worker=False)
    assert "\n" not in str(caught.value)


def test_inside_torchrun_the_process_count_is_not_rechecked():
    assert parse_options(["--gpus", "16"], 0, in_worker=True).gpus == 16
