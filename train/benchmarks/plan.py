"""make plan's figures against what they plan: the model itself, the bytes autograd saves, and a GPU's peak.

    python -m train.benchmarks.plan [--configs tiny,small,dense,llama-tiny] [--seq-lens 64,128] [--batch 2]
                                    [--precisions fp32,bf16,bf16-fsdp] [--device cpu|cuda]

On the CPU, four tables (figures only: tests/test_plan.py holds the bounds):

1. exact: per config, the plan's weights, gradients and AdamW states of one GPU (from the meta-device model)
   against a real model after one optimizer step: its parameters and buffers, .grad tensors and state tensors.
2. activations: per config, sequence length, precision and checkpointing mode, the plan's activations of a
   micro-batch against the bytes autograd saves for the backward in a real forward (measure_saved: every
   storage handed to torch.autograd.graph.saved_tensors_hooks once, parameters, buffers and autocast's weight
   copies apart), and the error. Precisions: fp32; bf16 autocast over float32 parameters (as DDP runs);
   bf16 parameters under bf16 autocast (as FSDP2's mixed precision runs). The CPU's attention kernel keeps
   the seq x seq scores where queries and values differ in head size (MLA), as the plan says for the CPU.
3. LoRA: the activation rows of a frozen base with adapters on the family's LoRA targets (lora_stand_in: the
   computation issue 18's LoRA layers make, until they exist), which keep less: a frozen matmul keeps no input.
4. selective: per config, what recomputing each block's attention or its feed-forward saves (measured) per
   FLOP of recompute (torch's FLOP counter), the figure that chose the feed-forward for selective.

With --device cuda (env/gpu_check.sh): per config, a real training step (bf16 autocast, fused AdamW, one
GPU) against the plan: torch.cuda.max_memory_allocated beside the plan's total less its CUDA context and
NCCL allowance, and the CUDA context this process measured (the GPU's used memory beyond what torch reserved).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from env.common.cli import ArgumentParser, run_cli
from train import activation_checkpointing
from train.benchmarks import benchmark_main
from train.config import RunConfig
from train.config_loader import load_config
from train.errors import ConfigError
from train.models import build_model, get_spec
from train.models.activations import FP32, MODES, Setting
from train.plan.levers import LORA_RANK
from train.plan.memory import CUDA_CONTEXT_BYTES, FULL_FINE_TUNE, GIB, Box, plan_memory, with_changes
from train.run import build_optimizer

PRECISIONS = ("fp32", "bf16", "bf16-fsdp")
# The bound tests/test_plan.py holds the activation rows to.
ACTIVATION_BOUND = 0.15
# Autograd nodes that view their input: a weight copy is found through them (unbind and select: one expert of a
# stacked [experts, out, in] weight).
VIEW_NODES = {
    "TBackward0",
    "TransposeBackward0",
    "ViewBackward0",
    "ExpandBackward0",
    "PermuteBackward0",
    "UnbindBackward0",
    "SelectBackward0",
}


@dataclass(frozen=True)
class Measured:
    """Bytes of the storages autograd keeps from a forward for its backward."""

    activations: int
    weight_copies: int  # autocast's low-precision copies of parameters


def _weight_copy(tensor: torch.Tensor, weights: dict[tuple[int, ...], list[torch.Tensor]]) -> bool:
    """Whether a saved tensor is (a view of) autocast's cast of a parameter: of a trainable one, a cast in the
    graph; of a frozen one, a tensor outside autograd that holds a parameter's values (or their transpose) in
    its own dtype. The values, not the shape alone: an activation made outside autograd (the experts' h1 and
    h3) can have a weight's shape when the rows happen to equal a width."""
    if tensor.grad_fn is None:
        if tensor.requires_grad:
            return False
        shape = tuple(tensor.shape)
        same = [(tensor, w) for w in weights.get(shape, [])]
        if tensor.dim() >= 2:  # a transposed cast: F.linear's, or grouped mm's of the stacked experts
            flipped = tensor.transpose(-2, -1)
            same += [(flipped, w) for w in weights.get(tuple(flipped.shape), [])]
        return any(torch.equal(t, w.to(t.dtype)) for t, w in same)
    node = _through_views(tensor.grad_fn)
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    return type(_through_views(node.next_functions[0][0])).__name__ == "AccumulateGrad"


def _through_views(node: Any) -> Any:
    while node is not None and type(node).__name__ in VIEW_NODES:
        node = node.next_functions[0][0]
    return node


def measure_saved(model: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[Measured, torch.Tensor]:
    """What `forward()` of `model` saves for the backward: every storage once, parameters and buffers not counted.
    Returns the figures and the loss (backward still possible)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # A stacked weight's experts are cast one by one: each is the weight less its first dimension.
    weights: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for p in model.parameters():
        for w in [p.detach()] * (p.dim() >= 2) + list(p.detach().unbind(0)) * (p.dim() >= 3):
            weights.setdefault(tuple(w.shape), []).append(w)
    activations: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        where = storage.data_ptr()
        if where and where not in owned and where not in activations and where not in copies:
            (copies if _weight_copy(tensor, weights) else activations)[where] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    return Measured(sum(activations.values()), sum(copies.values())), loss


def cpu_setting(precision: str) -> Setting:
    """The plan's Setting of each CPU precision of this benchmark."""
    return {"fp32": Setting(4, 4, "cpu"), "bf16": Setting(2, 4, "cpu"), "bf16-fsdp": Setting(2, 2, "cpu")}[precision]


def built(cfg: RunConfig, precision: str, mode: str, prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The model as a run of that precision and checkpointing mode computes (FSDP2's bf16 parameters as a cast),
    `prepare` applied to it first (lora_stand_in)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    activation_checkpointing.apply(model, get_spec(cfg.model.arch), mode)
    if prepare is not None:
        prepare(model)
    if precision == "bf16-fsdp":
        for parameter in model.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
    return model


def batch(cfg: RunConfig, size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.train.seed)
    shape = (size, cfg.data.seq_len)
    inputs = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
    targets = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
    return inputs.to(device), targets.to(device)


def measured_activations(
    cfg: RunConfig, size: int, precision: str, mode: str, prepare: Callable[[nn.Module], None] | None = None
) -> Measured:
    model = built(cfg, precision, mode, prepare)
    inputs, targets = batch(cfg, size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32")
    with autocast:
        measured, _ = measure_saved(model, lambda: model(inputs, targets))
    return measured


def planned_activations(cfg: RunConfig, size: int, precision: str, mode: str) -> float:
    spec = get_spec(cfg.model.arch)
    return size * spec.saved_for_backward(cfg.model, cfg.data.seq_len, cpu_setting(precision)).kept(mode)


@dataclass(frozen=True)
class ActivationRow:
    config: str
    seq_len: int
    precision: str
    mode: str
    planned: float
    measured: int

    @property
    def error(self) -> float:
        return (self.planned - self.measured) / self.measured


def activation_rows(
    configs: list[str], seq_lens: list[int], precisions: list[str], size: int, modes: tuple[str, ...] = MODES
) -> Iterator[ActivationRow]:
    for name in configs:
        for seq_len in seq_lens:
            cfg = sized(name, seq_len)
            for precision in precisions:
                for mode in modes:
                    measured = measured_activations(cfg, size, precision, mode).activations
                    planned = planned_activations(cfg, size, precision, mode)
                    yield ActivationRow(name, seq_len, precision, mode, planned, measured)


def sized(name: str, seq_len: int) -> RunConfig:
    """A config at seq_len tokens (its positions grown to fit), in fp32 as the CPU runs it."""
    cfg = load_config(name, ["train.precision=fp32"])
    positions = max(seq_len, getattr(cfg.model, "max_seq_len", seq_len))
    return replace(cfg, model=replace(cfg.model, max_seq_len=positions), data=replace(cfg.data, seq_len=seq_len))


def lora_stand_in(model: nn.Module, targets: tuple[str, ...], rank: int) -> None:
    """LoRA as issue 18's adapters compute it, for measuring only: the base frozen, and every nn.Linear named by
    `targets` (PEFT's target_modules) computing base(x) + B(A(x)) with A [rank, in] and B [out, rank]."""
    setting = Setting(FP32, FP32, adapters=targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and setting.adapted(name):
            module.lora_A = nn.Parameter(torch.randn(rank, module.in_features) / module.in_features)
            module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank))
            base = module.forward
            module.forward = lambda x, m=module, base=base: base(x) + F.linear(F.linear(x, m.lora_A), m.lora_B)


def lora_rows(configs: list[str], seq_len: int, precisions: list[str], size: int) -> Iterator[ActivationRow]:
    """Activation rows of a frozen base with rank-LORA_RANK adapters on the family's LoRA targets."""
    for name in configs:
        cfg = sized(name, seq_len)
        targets = get_spec(cfg.model.arch).lora_targets

        def adapters(model: nn.Module, targets: tuple[str, ...] = targets) -> None:
            lora_stand_in(model, targets, LORA_RANK)

        for precision in precisions:
            setting = replace(cpu_setting(precision), frozen_base=True, adapters=targets, adapter_rank=LORA_RANK)
            for mode in MODES:
                measured = measured_activations(cfg, size, precision, mode, adapters)
                planned = size * get_spec(cfg.model.arch).saved_for_backward(cfg.model, seq_len, setting).kept(mode)
                yield ActivationRow(name, seq_len, precision, mode, planned, measured.activations)


@dataclass(frozen=True)
class ExactRow:
    config: str
    kind: str
    planned: int
    actual: int


def exact_rows(name: str, size: int) -> list[ExactRow]:
    """The plan of one CPU process against a model, its gradients and AdamW's states after one step."""
    cfg = with_changes(load_config(name, ["train.precision=fp32"]), micro_batch=size)
    plan = plan_memory(cfg, Box(1, GIB), FULL_FINE_TUNE)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    model(*batch(cfg, size)).backward()
    optimizer.step()

    def nbytes(tensors: Iterator[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    actual = {
        "weights and buffers": nbytes(iter([*model.parameters(), *model.buffers()])),
        "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "AdamW states": nbytes(v for state in optimizer.state.values() for v in state.values()),
    }
    planned = {"weights and buffers": plan.weights, "gradients": plan.gradients, "AdamW states": plan.optimizer}
    return [ExactRow(name, kind, planned[kind], actual[kind]) for kind in actual]


def block_parts(model: nn.Module, arch: str, part: str) -> list[nn.Module]:
    """The `part` submodule (attn or ffn) of every block, main and MTP."""
    blocks = [getattr(unit, "block", unit) for unit in get_spec(arch).shard_units(model)]
    return [getattr(block, part) for block in blocks]


def selective_rows(name: str, seq_len: int) -> list[tuple[str, str, int, float]]:
    """(config, part, bytes its recompute saves, its forward FLOPs) for part in attn, ffn; one sample, bf16-fsdp."""
    cfg = sized(name, seq_len)
    inputs, targets = batch(cfg, 1)
    base = measured_activations(cfg, 1, "bf16-fsdp", "none").activations
    rows = []
    for part in ("attn", "ffn"):
        model = built(cfg, "bf16-fsdp", "none")
        parts = block_parts(model, cfg.model.arch, part)
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            model(inputs, targets)
        names = {id(module): f"{type(model).__name__}.{n}" for n, module in model.named_modules()}
        counts = counter.get_flop_counts()
        flops = sum(sum(counts.get(names[id(module)], {}).values()) for module in parts)
        for module in parts:
            activation_checkpointing.checkpoint_module(module)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured, _ = measure_saved(model, lambda m=model: m(inputs, targets))
        rows.append((name, part, base - measured.activations, float(flops)))
    return rows


def cuda_rows(configs: list[str], size: int) -> Iterator[tuple[str, str, int, int, int]]:
    """(config, mode, planned bytes less the allowance, max_memory_allocated, the CUDA context measured)."""
    device = torch.device("cuda")
    torch.cuda.init()
    for name in configs:
        for mode in ("none", "full"):
            cfg = with_changes(
                load_config(name, ["train.precision=bf16"]), micro_batch=size, activation_checkpointing=mode
            )
            plan = plan_memory(cfg, Box(1, torch.cuda.get_device_properties(0).total_memory))
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = built(cfg, "fp32", mode).to(device)
            optimizer = build_optimizer(model, cfg, device)
            inputs, targets = batch(cfg, size, "cuda")
            for _ in range(2):  # the second step holds the optimizer's states from the first
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(inputs, targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            free, total = torch.cuda.mem_get_info()
            context = total - free - torch.cuda.memory_reserved()
            del model, optimizer, loss
            yield name, mode, plan.total - plan.allowance, peak, context


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.plan", description=__doc__)
    parser.add_argument("--configs", default="tiny,small,dense,llama-tiny", help="comma list of configs")
    parser.add_argument("--seq-lens", default="64,128", help="comma list of sequence lengths (CPU tables)")
    parser.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    try:
        args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    except ValueError:
        raise ConfigError(f"--seq-lens {args.seq_lens!r}: give whole numbers, e.g. 64,128") from None
    args.precisions = [p for p in args.precisions.split(",") if p]
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown or args.batch < 1 or min(args.seq_lens) < 2:
        raise ConfigError(f"give --precisions among {', '.join(PRECISIONS)}, --batch >= 1 and --seq-lens >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda needs a CUDA GPU; this machine has none")
    return args


def run(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        print(f"{'config':<12} {'mode':<6} {'planned GiB':>12} {'peak GiB':>9} {'error':>7} {'context MiB':>12}")
        worst, contexts = 0.0, []
        for name, mode, planned, peak, context in cuda_rows(args.configs, args.batch):
            error = (planned - peak) / peak
            worst, contexts = max(worst, abs(error)), [*contexts, context]
            figures = f"{planned / GIB:>12.3f} {peak / GIB:>9.3f} {error:>+7.1%} {context / 2**20:>12.0f}"
            print(f"{name:<12} {mode:<6} {figures}")
        context = f"CUDA context measured {max(contexts) / 2**20:.0f} MiB (allowed: {CUDA_CONTEXT_BYTES / 2**20:.0f})"
        print(f"largest error: {worst:.1%}; {context}")
        return
    print("exact: one CPU process's weights, gradients and AdamW states, planned (meta model) vs after one step")
    print(f"{'config':<12} {'kind':<20} {'planned':>14} {'actual':>14}")
    for name in args.configs:
        for row in exact_rows(name, args.batch):
            print(f"{row.config:<12} {row.kind:<20} {row.planned:>14,} {row.actual:>14,}")
    bound = f"bound {ACTIVATION_BOUND:.0%}"
    print(f"\nactivations of a micro-batch of {args.batch}: planned vs saved for the backward ({bound})")
    print(f"{'config':<12} {'seq':>5} {'precision':<10} {'mode':<10} {'planned':>14} {'measured':>14} {'error':>7}")
    worst = 0.0
    for row in activation_rows(args.configs, args.seq_lens, args.precisions, args.batch):
        worst = max(worst, abs(row.error))
        print(
            f"{row.config:<12} {row.seq_len:>5} {row.precision:<10} {row.mode:<10} {row.planned:>14,.0f} "
            f"{row.measured:>14,} {row.error:>+7.2%}"
        )
    print(f"largest error: {worst:.2%}")
    print(f"\nLoRA: the same, the base frozen, rank {LORA_RANK} adapters on each family's LoRA targets (a stand-in)")
    for row in lora_rows(args.configs, max(args.seq_lens), args.precisions, args.batch):
        print(
            f"{row.config:<12} {row.seq_len:>5} {row.precision:<10} {row.mode:<10} {row.planned:>14,.0f} "
            f"{row.measured:>14,} {row.error:>+7.2%}"
        )
    seq_len = max(args.seq_lens)
    print(f"\nselective: what recomputing one part of every block saves, per FLOP of recompute (seq {seq_len}, bf16)")
    print(f"{'config':<12} {'part':<5} {'saved MiB':>10} {'GFLOP':>9} {'bytes/FLOP':>11}")
    for name in args.configs:
        for config, part, saved, flops in selective_rows(name, seq_len):
            print(f"{config:<12} {part:<5} {saved / 2**20:>10.2f} {flops / 1e9:>9.3f} {saved / flops:>11.5f}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("plan-bench", main)
