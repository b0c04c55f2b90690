"""`make bench`: the 1→N GPU scaling table — measured, predicted from the links, judged against a baseline.

    python -m train.bench --gpus N [--counts 1,2,3] [--config C] [--steps S] [--run-dir D]
                          [--baseline NAME|PATH] [--nccl-json PATH] [--link NAME]
                          [--micro-batch B] [--accum A] [--precision P] [--strategy S] [--seed X] [key=value ...]

Weak scaling, as published scaling tables are made: the per-GPU micro-batch stays fixed and the
global batch is n x micro_batch x accum. For every count n, a real training job runs through
`python -m train.launch --gpus n` on synthetic data (so the data source never limits it), in
RUN_DIR/n{n}/, and its summary.json gives the measured figures (steady state: the summary drops
the first logged windows). From them:

- measured: samples/s, speedup over the 1-GPU row, efficiency (speedup / n), tokens/s, MFU, step
  time; compute = the 1-GPU step time, exposed communication = step_n - step_1 (what the
  other ranks' traffic adds to a step after whatever overlap DDP achieved).
- predicted: the bytes each step moves (parameters x wire bytes per element: fp32 gradients, or
  bf16/fp16 with DDP compression; FSDP's all-gathers and reduce-scatter) over a ring, whose time
  is bus_factor(n) x bytes / busbw (nccl-tests' definition of busbw, so a measured busbw plugs in
  directly). busbw comes from `make nccl-test JSON=...` (--nccl-json), else from the links NVML
  reports (env/machine/links.py), else from a named assumption (--link). Predicted step = compute + comm
  with no overlap: an upper bound on the step time, a lower bound on the speedup.
- baseline (--baseline): a previous bench.json or a shipped claim (train/baselines/NAME.json);
  per row and overall REPRODUCED (within ±10% of its samples/s), BETTER or REFUTED, and NOT
  COMPARABLE where the device or the workload differs: a CPU run cannot judge a GPU claim.

Noise: every count runs --repeats times (interleaved: 1..N, then 1..N again, so a load that comes
and goes hits every count), and every steady logged window of every repeat is one measurement. A
point is the median of its measurements; its spread is their half-range around it. When a spread is
wider than ±10%, or an efficiency stays above 100% even at the edge of the spreads, the figures are
NOISE-BOUND: the table's noise column and a NOISE line say which and why, and the exit code is 3.

Writes RUN_DIR/bench.json (loadable as a later --baseline), bench.csv, bench.md, bench.png (when
matplotlib is installed) and manifest.json. Exit: 0 done, 2 bad input, 3 done but the figures are
noise-bound (rerun on an idle machine, or with more STEPS), else a failed run's code.

One module per concern: bandwidth (where busbw comes from), comm (the bytes a step moves and the
prediction), baseline (verdicts), measure (the runs, their windows and noise), report (bench.json and
its table, CSV, Markdown and PNG), cli (arguments, the plan, main).
"""

from __future__ import annotations

from env.common.cli import UserError


class BenchError(UserError):
    """Bad input: one line naming the problem and the fix, exit 2."""


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("s") else "s")


def counted(n: int, unit: str) -> str:
    """ "1 GPU", "3 GPUs", "2 CPU processes"."""
    return f"{n} {unit if n == 1 else plural(unit)}"
