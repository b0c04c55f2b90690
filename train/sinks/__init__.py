"""Where a run's figures go: one `Sink` per destination, chosen by `train.sinks` (a list of names).

Adding a destination is one file here and one row in SINKS: a class taking the run's SinkContext, with
`log(record)` for every logged step and `close(summary, files)` at the end (the whole run's summary and
the files made then, such as loss.png). Only the main rank makes sinks. The records are metrics.jsonl's
rows: step, loss, val_loss, lr, tokens_per_sec, mfu, step_ms, peak memory, grad norm, and so on.
"""

from __future__ import annotations

from collections.abc import Callable

from train.sinks.base import Sink, SinkContext
from train.sinks.console import ConsoleSink
from train.sinks.jsonl import JsonlSink
from train.sinks.tensorboard import TensorBoardSink

# The sinks by name, in the order they are given each record.
SINKS: dict[str, Callable[[SinkContext], Sink]] = {
    "console": ConsoleSink,
    "jsonl": JsonlSink,
    "tensorboard": TensorBoardSink,
}


def make_sinks(names: list[str], context: SinkContext) -> list[Sink]:
    """The sinks named in train.sinks (the loader has checked each name), in SINKS's order."""
    return [make(context) for name, make in SINKS.items() if name in names]


__all__ = ["SINKS", "Sink", "SinkContext", "make_sinks"]
