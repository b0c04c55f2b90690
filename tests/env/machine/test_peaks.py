"""The peak FLOP table: device names to their published dense peaks, and no borrowed figure for an unknown GPU."""

from __future__ import annotations

import pytest

from env.machine.peaks import PEAKS, peak_flops


@pytest.mark.parametrize(
    ("name", "precision", "label", "tflops"),
    [
        ("NVIDIA GeForce RTX 4090", "bf16", "RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 4090", "fp32", "RTX 4090", 82.6),
        ("NVIDIA GeForce RTX 3090", "fp16", "RTX 3090", 71.0),
        ("NVIDIA GeForce RTX 5090", "bf16", "RTX 5090", 209.5),
        ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "bf16", "H100 NVL", 835.5),
        ("NVIDIA H200", "bf16", "H200 SXM", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp16", "A100", 312.0),
        ("NVIDIA A10", "bf16", "A10", 125.0),
        ("NVIDIA L4", "bf16", "L4", 121.0),
        ("NVIDIA L40S", "bf16", "L40S", 362.05),
        ("NVIDIA RTX A6000", "bf16", "RTX A6000", 154.8),
        ("NVIDIA RTX 6000 Ada Generation", "bf16", "RTX 6000 Ada", 364.2),
    ],
)
def test_peak_table_matches_device_names(name, precision, label, tflops):
    lookup = peak_flops(name, precision)
    assert lookup.matched == label
    assert lookup.flops == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA A10G",
        "NVIDIA GeForce GTX 1080",
        "Z9",
    ],
)
def test_unknown_gpu_gets_no_borrowed_figure(name):
    lookup = peak_flops(name, "bf16")
    assert lookup.flops is None and lookup.matched is None
    assert "unknown GPU" in lookup.note and "env/machine/peaks.py" in lookup.note


def test_cpu_and_unknown_precision_get_no_peak_with_a_reason():
    assert peak_flops("cpu", "fp32").flops is None
    assert "CPU" in peak_flops("cpu", "fp32").note
    lookup = peak_flops("NVIDIA H200", "int8")
    assert lookup.flops is None and "bf16" in lookup.note


def test_every_row_is_reachable_by_its_own_label():
    """A row shadowed by an earlier, broader pattern would never be used."""
    for row in PEAKS:
        assert peak_flops(f"NVIDIA {row.label.replace(' SXM', '')}", "bf16").matched == row.label
