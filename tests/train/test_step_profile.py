"""The step profiler's arithmetic on a known trace, and its CLI on CPU."""

from __future__ import annotations

import pytest

from env.common.cli import exit_code
from train.benchmarks import step_profile
from train.benchmarks.step_profile import summarize, union_us


def test_union_counts_overlapping_intervals_once() -> None:
    assert union_us([]) == 0
    assert union_us([(0, 10), (20, 25)]) == 15  # disjoint
    assert union_us([(0, 10), (5, 15)]) == 15  # overlapping (two streams)
    assert union_us([(0, 10), (2, 3), (12, 14)]) == 12  # nested, then disjoint
    assert union_us([(30, 40), (0, 35)]) == 40  # out of order


def _event(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_a_two_step_trace_gives_figures_per_step() -> None:
    events = [
        # step 1: two kernels overlapping on two streams, a copy to the host, one synchronize
        _event("kernel", "gemm", 0, 400),
        _event("kernel", "elementwise", 300, 200),
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 600, 10),
        _event("cuda_runtime", "cudaStreamSynchronize", 590, 30),
        _event("cuda_runtime", "cudaLaunchKernel", 0, 5),  # a launch is not a sync
        # step 2: the gemm again and a memset
        _event("kernel", "gemm", 1000, 400),
        _event("gpu_memset", "Memset (Device)", 1500, 100),
        _event("cpu_op", "aten::mm", 0, 2000),  # host time is not device time
        {"ph": "M", "name": "process_name", "cat": "kernel"},  # metadata, not an interval
    ]
    result = summarize(events, steps=2, wall_ms=1.0)
    # busy: [0, 500) + [600, 610) + [1000, 1400) + [1500, 1600) = 1010 us over 2 steps
    assert result.device_busy_ms == pytest.approx(0.505)
    assert result.busy_share == pytest.approx(0.505)
    assert (result.kernels, result.sync_calls, result.copies_to_host) == (1.5, 0.5, 0.5)
    assert result.top_kernels[0].name == "gemm"
    assert result.top_kernels[0].ms_per_step == pytest.approx(0.4) and result.top_kernels[0].calls_per_step == 1


def test_a_trace_without_device_activity_reports_none() -> None:
    result = summarize([_event("cpu_op", "aten::mm", 0, 50)], steps=1, wall_ms=2.0)
    assert result.device_busy_ms is None and result.busy_share is None and result.kernels == 0


def test_the_cli_profiles_a_cpu_step_and_lists_the_host_operators(capsys, tmp_path) -> None:
    trace = tmp_path / "trace.json"
    assert step_profile.main(["--steps", "1", "--trace", str(trace), "model.n_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "device busy   :       n/a" in out and "top operators by host (self CPU) time:" in out
    assert "aten::mm" in out and trace.stat().st_size > 0


def test_zero_steps_is_one_line_and_exit_2(capsys) -> None:
    assert exit_code("step-profile", step_profile.main, ["--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "torchrig step-profile: --steps 0: profile at least 1 step"
