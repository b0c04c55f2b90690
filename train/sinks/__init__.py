"""Where a run's figures go: one `Sink` per destination, chosen by `train.sinks` (a list of names).

Adding a destination is one file here and one row in SINKS: a class taking the run's SinkContext, with
`log(record)` for every logged step and `close(summary, files)` at the end (the whole run's summary and
the files made then, such as loss.png). Only the main rank makes sinks. The records are metrics.jsonl's
rows: step, loss, val_loss, lr, tokens_per_sec, mfu, step_ms, peak memory, grad norm, and so on.

The trackers are also switched on by the environment their users already set (CHOSEN_BY_ENVIRONMENT):
WANDB_PROJECT (unless WANDB_MODE=disabled) adds wandb, MLFLOW_TRACKING_URI adds mlflow, to whatever
train.sinks lists. A tracker named in train.sinks whose package is missing stops the run in one line;
one the environment chose says so in one warning line, and the run goes on without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from train.sinks.base import Sink, SinkContext
from train.sinks.console import ConsoleSink
from train.sinks.jsonl import JsonlSink
from train.sinks.mlflow import MlflowSink
from train.sinks.tensorboard import TensorBoardSink
from train.sinks.tracker import SinkUnavailable
from train.sinks.wandb import WandbSink

# The sinks by name, in the order they are given each record.
SINKS: dict[str, Callable[[SinkContext], Sink]] = {
    "console": ConsoleSink,
    "jsonl": JsonlSink,
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
    "mlflow": MlflowSink,
}
# Trackers the environment switches on, beside train.sinks: the variable their users set, and the test of it.
CHOSEN_BY_ENVIRONMENT: dict[str, tuple[str, Callable[[Mapping[str, str]], bool]]] = {
    "wandb": ("WANDB_PROJECT", lambda env: bool(env.get("WANDB_PROJECT")) and env.get("WANDB_MODE") != "disabled"),
    "mlflow": ("MLFLOW_TRACKING_URI", lambda env: bool(env.get("MLFLOW_TRACKING_URI"))),
}


def chosen_sinks(names: list[str], environ: Mapping[str, str]) -> list[str]:
    """train.sinks and the trackers the environment chose, in SINKS's order."""
    chosen = set(names) | {n for n, (_, test) in CHOSEN_BY_ENVIRONMENT.items() if test(environ)}
    return [name for name in SINKS if name in chosen]


def make_sinks(names: list[str], context: SinkContext, environ: Mapping[str, str] = os.environ) -> list[Sink]:
    """The sinks named in train.sinks (the loader has checked each name) and those the environment chose."""
    made = []
    for name in chosen_sinks(names, environ):
        try:
            made.append(SINKS[name](context))
        except SinkUnavailable as exc:
            if name in names:
                raise
            variable = CHOSEN_BY_ENVIRONMENT[name][0]
            context.console.write(f"torchrig: warning: {variable} is set, but {exc}; training goes on without it\n")
    return made


__all__ = ["SINKS", "Sink", "SinkContext", "chosen_sinks", "make_sinks"]
