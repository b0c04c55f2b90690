"""Peak dense tensor-core FLOP/s per GPU, for MFU.

One row per GPU model, matched against the name NVML and torch report (`nvidia-smi -L`,
`torch.cuda.get_device_name()`). Rows are tried in order and the first pattern that matches
wins, so specific variants ("H100 PCIe") come before the family row ("H100", the SXM part).
An unknown GPU gets no figure: borrowing another card's peak would make MFU a fiction.

Figures are vendor datasheet / architecture whitepaper numbers WITHOUT structured sparsity.
bf16/fp16 are the rates with FP32 accumulation, which is what PyTorch uses; GeForce cards run
FP16-accumulate at twice that, a rate PyTorch training never sees. fp32 is the TF32 tensor-core
rate, reached only with TF32 matmuls enabled (train.tf32: true); plain FP32 is far lower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TERA = 1e12


@dataclass(frozen=True)
class GpuPeak:
    pattern: str  # regular expression searched case-insensitively in the device name
    label: str
    bf16_tflops: float
    fp16_tflops: float
    tf32_tflops: float


# Ordered: variants before the family pattern they would also match.
PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak(r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0, 756.0, 378.0),
    GpuPeak(r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5, 835.5, 417.5),
    GpuPeak(r"\bH100\b", "H100 SXM", 989.4, 989.4, 494.7),
    GpuPeak(r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5, 835.5, 417.5),
    GpuPeak(r"\bH200\b", "H200 SXM", 989.4, 989.4, 494.7),
    GpuPeak(r"\bA100\b", "A100", 312.0, 312.0, 156.0),
    GpuPeak(r"\bA10$", "A10", 125.0, 125.0, 62.5),
    GpuPeak(r"\bL40S\b", "L40S", 362.05, 362.05, 183.0),
    GpuPeak(r"\bL40$", "L40", 181.05, 181.05, 90.5),
    GpuPeak(r"\bL4$", "L4", 121.0, 121.0, 60.0),
    GpuPeak(r"\bRTX A6000$", "RTX A6000", 154.8, 154.8, 77.4),
    GpuPeak(r"\bRTX 6000 Ada\b", "RTX 6000 Ada", 364.2, 364.2, 182.1),
    GpuPeak(r"\bRTX 5090$", "RTX 5090", 209.5, 209.5, 104.8),
    GpuPeak(r"\bRTX 4090$", "RTX 4090", 165.2, 165.2, 82.6),
    GpuPeak(r"\bRTX 3090$", "RTX 3090", 71.0, 71.0, 35.6),
)

PRECISION_FIELDS = {"bf16": "bf16_tflops", "fp16": "fp16_tflops", "fp32": "tf32_tflops"}
CPU_NAMES = ("", "cpu")


@dataclass(frozen=True)
class PeakLookup:
    flops: float | None  # peak FLOP/s of one device, None when unknown
    matched: str | None  # the table row's label
    note: str


def find_row(gpu_name: str) -> GpuPeak | None:
    name = gpu_name.strip()
    return next((row for row in PEAKS if re.search(row.pattern, name, re.IGNORECASE)), None)


def peak_flops(gpu_name: str, precision: str) -> PeakLookup:
    """One device's peak dense FLOP/s for precision ("bf16", "fp16" or "fp32" meaning TF32)."""
    if gpu_name.strip().lower() in CPU_NAMES:
        return PeakLookup(None, None, "CPU run: no tensor-core peak, so MFU is not reported")
    if precision not in PRECISION_FIELDS:
        return PeakLookup(None, None, f"precision {precision!r} has no peak; use one of {', '.join(PRECISION_FIELDS)}")
    row = find_row(gpu_name)
    if row is None:
        return PeakLookup(
            None,
            None,
            f"unknown GPU {gpu_name!r}: MFU is not reported; add a GpuPeak row (name pattern, dense "
            "bf16/fp16/tf32 TFLOP/s from the vendor datasheet, without sparsity) to PEAKS in env/machine/peaks.py",
        )
    tflops = getattr(row, PRECISION_FIELDS[precision])
    kind = "TF32 tensor" if precision == "fp32" else f"{precision} tensor, FP32 accumulate,"
    return PeakLookup(tflops * TERA, row.label, f"{row.label}: {tflops:g} TFLOP/s dense {kind} per GPU")
