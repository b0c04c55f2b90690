"""nccl-test: bus-bandwidth factors, size parsing, the collectives table, the verdict, and gloo runs end to end."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import env.nccl.launch as nccl_test
from env.common.cli import CPU_DEFAULT_WORKERS, UserError, exit_code
from env.machine.links import (
    LINK_KINDS,
    NVLINK_BY_COMPUTE_CAPABILITY,
    PCIE_LANE_GBPS,
    Expectation,
    expected_busbw,
    judge,
)
from env.machine.nvml import Snapshot
from env.nccl.collectives import COLLECTIVES, CORRUPT_ENV, DTYPES, element_count, pattern, percentile, summed
from env.nccl.options import parse_options, parse_sizes
from env.nccl.worker import STALL_ENV
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "nvml"
GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10


# ---- bus bandwidth and sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_busbw_factors_are_nccl_tests(ranks: int):
    n = ranks
    expected = {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "broadcast": 1.0,
    }
    assert {name: row.busbw_factor(n) for name, row in COLLECTIVES.items()} == pytest.approx(expected)


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


def test_sharded_ops_round_counts_to_whole_chunks():
    for world in (2, 3, 7):
        for size in (1, 8, 1000, 4096):
            for row in COLLECTIVES.values():
                count = element_count(row, size, 4, world)
                assert count >= 1
                if row.sharded:
                    assert count % world == 0 and count >= world


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile([7.0], 99) == 7.0


# ---- the table's expected results agree with the collectives' definitions ------------------------------------


def simulate(name: str, sends: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """What each rank receives, straight from the definition of each collective."""
    if name == "all_reduce":
        return [sum(sends)] * world
    if name == "all_gather":
        return [torch.cat(sends)] * world
    if name == "reduce_scatter":
        return list(sum(sends).chunk(world))
    if name == "all_to_all":
        return [torch.cat([sends[q].chunk(world)[r] for q in range(world)]) for r in range(world)]
    return [sends[COLLECTIVES[name].root]] * world  # broadcast


@pytest.mark.parametrize("name", list(COLLECTIVES))
@pytest.mark.parametrize("world", [2, 3])
def test_expected_results_match_the_collective(name: str, world: int):
    row = COLLECTIVES[name]
    count = element_count(row, 4 * 250, 4, world)
    like = torch.empty(0)
    sends = []
    for rank in range(world):
        data = row.send_input(count, rank, world, torch.empty(row.send_elems(count, world)))
        sends.append(data if data is not None else pattern(0, count, row.root, world, like))
    received = simulate(name, sends, world)
    for rank in range(world):
        assert received[rank].numel() == row.recv_elems(count, world)
        for offset, piece in row.expected(count, rank, world, like):
            assert torch.equal(received[rank][offset : offset + piece.numel()], piece)
    # and a shifted result would be caught
    shifted = received[0].roll(1)
    assert any(not torch.equal(shifted[o : o + p.numel()], p) for o, p in row.expected(count, 0, world, like))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sums_are_exact_in_every_dtype(dtype: str):
    world = 8
    like = torch.empty(0, dtype=DTYPES[dtype].torch_dtype)
    exact = sum(pattern(0, 5000, rank, world, torch.empty(0, dtype=torch.int64)) for rank in range(world))
    assert torch.equal(summed(0, 5000, world, like).to(torch.int64), exact)
    ranks = [pattern(0, 5000, rank, world, like) for rank in range(world)]
    assert not torch.equal(ranks[0], ranks[1])  # ranks send different data


# ---- the verdict -----------------------------------------------------------------------------------------------


def box(name: str) -> Snapshot:
    return Snapshot.load(FIXTURES / f"{name}.json")


def test_nvlink_expectation_is_generation_rate_times_links():
    h100 = expected_busbw(box("box_8xh100_nvlink"), list(range(8)), "on")
    rate = NVLINK_BY_COMPUTE_CAPABILITY[(9, 0)].link_gbps
    assert h100.busbw_gbps == pytest.approx(18 * rate * LINK_KINDS["nvlink"].efficiency)
    assert "NVLink" in h100.link
    rtx3090 = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "on")
    assert rtx3090.busbw_gbps == pytest.approx(4 * NVLINK_BY_COMPUTE_CAPABILITY[(8, 6)].link_gbps * 0.8)


def test_pcie_expectation_is_gen_times_width_with_a_lower_floor_without_p2p():
    snapshot = box("box_3x4090_pcie")
    for pair in snapshot.pairs:  # as if the board allowed P2P
        pair.p2p_read = pair.p2p_write = "OK"
    raw = PCIE_LANE_GBPS[4] * 16
    with_p2p = expected_busbw(snapshot, [0, 1, 2], "on")
    without = expected_busbw(snapshot, [0, 1, 2], "off")
    assert with_p2p.busbw_gbps == pytest.approx(raw * LINK_KINDS["pcie_p2p"].efficiency)
    assert without.busbw_gbps == pytest.approx(raw * LINK_KINDS["pcie_host"].efficiency)
    assert without.busbw_gbps < with_p2p.busbw_gbps
    # NVML's own "no P2P" means host memory even when P2P is not switched off
    assert expected_busbw(box("box_3x4090_pcie"), [0, 1, 2], "on").busbw_gbps == pytest.approx(without.busbw_gbps)


def test_nccl_p2p_disable_takes_nvlink_away_too():
    on = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "on")
    off = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "off")
    assert off.busbw_gbps < on.busbw_gbps and "without P2P" in off.link


def test_unknown_links_are_not_judged():
    assert expected_busbw(Snapshot(error="NVML unavailable"), [0, 1], "on").busbw_gbps is None
    assert expected_busbw(box("box_2x3090_nvlink"), [0], "on").busbw_gbps is None


@pytest.mark.parametrize(("share", "status"), [(1.1, "PASS"), (0.8, "PASS"), (0.5, "WARN"), (0.2, "FAIL")])
def test_verdict_bands(share: float, status: str):
    expectation = Expectation(100.0, link="NVLink")
    verdict = judge(wrong=0, measured_busbw=100.0 * share, expectation=expectation, min_busbw=None)
    assert verdict.status == status and verdict.expected_busbw == 100.0
    assert "100.0 GB/s expected" in verdict.reason and "NVLink" in verdict.reason
    assert verdict.exit_code == (1 if status == "FAIL" else 0)


def test_min_busbw_overrides_the_links():
    expectation = Expectation(100.0, link="NVLink")
    assert judge(wrong=0, measured_busbw=20.0, expectation=expectation, min_busbw=15.0).status == "PASS"
    failed = judge(wrong=0, measured_busbw=90.0, expectation=expectation, min_busbw=95.0)
    assert failed.status == "FAIL" and "--min-busbw" in failed.reason
    assert judge(wrong=0, measured_busbw=1.0, expectation=Expectation(None, why_not="gloo"), min_busbw=2.0).exit_code


def test_any_wrong_element_fails_whatever_the_bandwidth():
    verdict = judge(wrong=1, measured_busbw=1000.0, expectation=Expectation(100.0, link="x"), min_busbw=1.0)
    assert verdict.status == "FAIL" and "wrong" in verdict.reason


def test_without_an_expectation_correctness_decides():
    verdict = judge(wrong=0, measured_busbw=0.01, expectation=Expectation(None, why_not="no GPU"), min_busbw=None)
    assert verdict.status == "PASS" and "not judged: no GPU" in verdict.reason


# ---- options and the launcher side -----------------------------------------------------------------------------


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


def test_main_rejects_bad_input_before_launching(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(nccl_test, "launch_workers", lambda *a: pytest.fail("launched despite bad input"))
    assert exit_code("nccl-test", nccl_test.main, ["--ops", "all_reduce", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchrig nccl-test: --dtype int8") and "\n" not in err


def test_main_hands_valid_input_to_the_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    seen = {}

    def fake_launch(options, argv, cuda_gpus):
        seen.update(options=options, argv=argv)
        return 0

    monkeypatch.setattr(nccl_test, "launch_workers", fake_launch)
    argv = ["--gpus", "2", "--ops", "all", "--sizes", "8:1K:2"]
    assert nccl_test.main(argv) == 0
    assert seen["argv"] == argv and seen["options"].gpus == 2 and seen["options"].sizes[-1] == KiB


# ---- gloo runs: 2 CPU processes, tiny sizes --------------------------------------------------------------------

GLOO_ARGS = ["--sizes", "8:4K:8", "--iters", "2", "--warmup", "1", "--first-timeout", "20"]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHRIG_", "NCCL_"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def torchrun(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "env.nccl.launch", *args]
    return subprocess.run(command, cwd=ROOT, env=worker_env(**extra), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_gloo_run_of_every_op_prints_the_table_and_writes_json(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    done = torchrun(["--ops", "all", "--json", str(record_path), *GLOO_ARGS])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "time   algbw   busbw  #wrong" in out
    assert out.count("# Out of bounds values : 0 OK") == len(COLLECTIVES)
    assert out.count("# Avg bus bandwidth") == len(COLLECTIVES)
    assert "VERDICT: PASS" in out and "bandwidth not judged: no GPU" in out
    record = json.loads(record_path.read_text())
    assert record["world_size"] == 2 and record["verdict"]["status"] == "PASS"
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["nccl_pinned"]
    assert record["p2p"]["source"] in ("no-gpu", "user")
    assert {row["op"] for row in record["rows"]} == set(COLLECTIVES)
    keys = {"op", "bytes", "count", "time_us", "algbw", "busbw", "wrong", "lat_median_us", "lat_p99_us"}
    for row in record["rows"]:
        assert keys <= set(row) and row["wrong"] == 0 and row["time_us"] > 0
        assert row["busbw"] == pytest.approx(row["algbw"] * COLLECTIVES[row["op"]].busbw_factor(2))


@pytest.mark.slow
def test_corrupted_results_are_counted_and_fail(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    done = torchrun(["--ops", "all_reduce,all_gather", "--json", str(record_path), *GLOO_ARGS], **{CORRUPT_ENV: "2"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "VERDICT: FAIL" in done.stdout
    record = json.loads(record_path.read_text())
    assert record["verdict"]["status"] == "FAIL"
    assert all(row["wrong"] == 2 for row in record["rows"])


@pytest.mark.slow
def test_a_hung_first_collective_ends_in_one_fail_line():
    began = time.monotonic()
    done = torchrun(["--first-timeout", "3", "--sizes", "8"], **{STALL_ENV: "1"})
    assert done.returncode != 0
    assert time.monotonic() - began < 60
    lines = [line for line in done.stdout.splitlines() if "did not finish" in line]
    assert len(lines) == 1 and "NCCL_P2P_DISABLE=1" in lines[0] and "/dev/shm" in lines[0]


@pytest.mark.slow
def test_the_cli_launches_its_own_workers_and_exits_with_the_verdict(tmp_path: Path):
    record_path = tmp_path / "nccl.json"
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "env.nccl.launch", "--gpus", "2", "--json", str(record_path),
               "--run-dir", str(run_dir), *GLOO_ARGS]  # fmt: skip
    done = subprocess.run(
        [*command, "--min-busbw", "100000"], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nccl-test: P2P" in done.stdout and "below --min-busbw" in done.stdout
    assert json.loads(record_path.read_text())["world_size"] == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "nccl-test" and manifest["p2p"]["source"] == "no-gpu"


def test_a_second_nccl_test_into_a_held_run_dir_is_refused_at_once(tmp_path: Path):
    from env.records.runlock import RunDirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunDirLock(run_dir):  # the first job, running
        command = [sys.executable, "-m", "env.nccl.launch", "--gpus", "2", "--run-dir", str(run_dir), *GLOO_ARGS]
        done = subprocess.run(command, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("in use by a running job") == 1 and f"(pid {os.getpid()} on host" in done.stderr
    assert not (run_dir / "manifest.json").exists()
