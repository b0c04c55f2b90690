"""The communication each step needs, and the step time and speedup it predicts.

Each collective's time is busbw_factor(n) x payload bytes / busbw, the factor taken from env/nccl/collectives.py's
table (nccl-tests' definition of busbw, so a measured busbw plugs in directly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from env.nccl.collectives import COLLECTIVES


@dataclass(frozen=True)
class Transfer:
    """One collective a step runs: time = busbw_factor(n) x payload bytes / busbw (nccl-tests' busbw)."""

    collective: str  # a row of env/nccl/collectives.py's table
    payload: str  # "gradients" or "parameters"
    per_micro_batch: bool  # FSDP gathers parameters for every micro-batch; gradients reduce once per step


# What each strategy moves per optimizer step. Small collectives (the loss, MoE counts) are latency, not bytes.
COMM_PLANS: dict[str, tuple[Transfer, ...]] = {
    "ddp": (Transfer("all_reduce", "gradients", per_micro_batch=False),),
    "fsdp": (
        Transfer("all_gather", "parameters", per_micro_batch=True),  # forward
        Transfer("all_gather", "parameters", per_micro_batch=True),  # backward (resharded)
        Transfer("reduce_scatter", "gradients", per_micro_batch=False),
    ),
}
HALF_PRECISIONS = ("bf16", "fp16")


def wire_element_bytes(payload: str, strategy: str, precision: str, compression: str) -> int:
    """Bytes per element on the wire: fp32 gradients unless DDP compresses them; FSDP gathers in the AMP dtype."""
    if payload == "parameters":
        return 2 if precision in HALF_PRECISIONS else 4
    return 2 if strategy == "ddp" and compression in HALF_PRECISIONS else 4


@dataclass(frozen=True)
class CommPlan:
    strategy: str
    params: int
    accum: int
    element_bytes: dict[str, int]  # payload -> bytes per element

    @classmethod
    def for_run(cls, params: int, strategy: str, precision: str, compression: str, accum: int) -> CommPlan:
        sizes = {
            t.payload: wire_element_bytes(t.payload, strategy, precision, compression) for t in COMM_PLANS[strategy]
        }
        return cls(strategy, params, accum, sizes)

    def payload_bytes(self, payload: str) -> int:
        return self.params * self.element_bytes[payload]

    def seconds(self, n: int, busbw_gbps: float) -> float:
        """Predicted communication time per optimizer step on n ranks, nothing overlapped."""
        total = 0.0
        for transfer in COMM_PLANS[self.strategy]:
            calls = self.accum if transfer.per_micro_batch else 1
            factor = COLLECTIVES[transfer.collective].busbw_factor(n)
            total += calls * factor * self.payload_bytes(transfer.payload) / (busbw_gbps * 1e9)
        return total

    def describe(self) -> str:
        parts = [
            f"{t.collective} of {t.payload} ({self.payload_bytes(t.payload) / 1e6:,.1f} MB)"
            + (f" x{self.accum}" if t.per_micro_batch and self.accum > 1 else "")
            for t in COMM_PLANS[self.strategy]
        ]
        return f"{self.params:,} parameters; per step: {', '.join(parts)}"


def add_prediction(rows: list[dict[str, Any]], plan: CommPlan, busbw_gbps: float) -> None:
    """Predicted step = the 1-GPU step (compute) + the ring's time for the step's bytes, no overlap."""
    one = next(row for row in rows if row["gpus"] == 1)
    for row in rows:
        n = row["gpus"]
        comm_ms = plan.seconds(n, busbw_gbps) * 1000
        pred_step = one["step_ms"] + comm_ms
        pred_speedup = n * one["step_ms"] / pred_step  # weak scaling: n times the samples per step
        row.update(
            pred_comm_ms=comm_ms,
            pred_step_ms=pred_step,
            pred_speedup=pred_speedup,
            pred_samples_per_sec=pred_speedup * one["samples_per_sec"],
        )
