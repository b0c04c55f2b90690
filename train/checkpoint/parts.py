"""The training state as Stateful parts: each knows its own state; the checkpointer knows none of them.

A part is anything with state_dict() and load_state_dict() (torch.distributed.checkpoint.stateful.Stateful):
a GradScaler already is one. state_dict() is called on every rank; tensors in it are stored through
torch.distributed.checkpoint (each rank writes its shards; a replicated tensor is written once), every
other value must be plain data (train/checkpoint/plain.py) and is taken from rank 0, so a part whose
plain values differ between ranks gathers them itself, as RNGState does.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from typing import Any

import torch
from torch import nn

from train.checkpoint.ranks import all_gather

log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers, whose state_dict keys carry no prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def in_model_layout(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A dict keyed by `model`'s parameter names, saved by an earlier layout of the model, in the layout it holds.

    Through the model's own `import_state_dict` where it has one (the DeepSeek experts, stacked since
    checkpoints held one tensor per expert); unchanged otherwise.
    """
    convert = getattr(unwrap_model(model), "import_state_dict", None)
    return convert(state) if convert is not None else state


class ModelState:
    """Parameters and persistent buffers (the MoE balancing biases among them), by fully qualified name.

    Through DCP's state_dict helpers: plain tensors under DDP, DTensor shards under FSDP, so the same
    checkpoint loads at another world size.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(unwrap_model(self.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(unwrap_model(self.model), model_state_dict=in_model_layout(self.model, state))


class OptimizerState:
    """The optimizer's state keyed by parameter name (not position), as DCP's helpers lay it out."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap_model(self.model), self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {
            **state,
            "state": in_model_layout(self.model, state["state"]),
            "param_groups": [
                {**group, "params": list(in_model_layout(self.model, dict.fromkeys(group["params"])))}
                for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(unwrap_model(self.model), self.optimizer, optim_state_dict=state)


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states (Python, NumPy if loaded, torch CPU, the current CUDA device) as plain data.

    Only the current CUDA device: each rank drives one GPU, and reading another device's
    generator would create a CUDA context (hundreds of MiB) on a GPU another rank owns.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss_next], "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [str(kind), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what capture_rng returned; the CUDA state goes to this rank's current device (none: skipped)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    torch.set_rng_state(state["torch"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _derived_seed(saved: list[dict[str, Any]], rank: int) -> int:
    """A seed for `rank` drawn from every saved rank's torch state: the same checkpoint gives the same seeds."""
    digest = hashlib.sha256(rank.to_bytes(8, "little"))
    for state in saved:
        digest.update(state["torch"].numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


class RNGState:
    """Every rank's generators; each rank gets its own back at the same world size.

    At another world size there is no rank-for-rank match, so each rank's generators are re-seeded
    from the saved states and its rank (deterministic, but not the stream an unchanged run would have
    drawn). Training does not depend on it: the data order is a pure function of (seed, step), and
    the models here draw no random numbers after initialisation.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "ranks": all_gather(capture_rng())}  # every rank calls this

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] == self.world_size:
            restore_rng(state["ranks"][self.rank])
            return
        seed = _derived_seed(state["ranks"], self.rank)
        random.seed(seed)
        torch.manual_seed(seed)  # every CUDA device too
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(seed % 2**32)
        if self.rank == 0:
            log.warning(
                f"the checkpoint was saved by {state['world_size']} ranks and this run has {self.world_size}: "
                "each rank's random generators are re-seeded from the saved ones (the data order stays exact)"
            )
