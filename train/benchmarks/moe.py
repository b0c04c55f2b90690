"""The MoE against a dense model of the same active size, and its host syncs: this code and the one before.

    python -m train.benchmarks.moe [--tables layer,step,syncs,compile] [--shapes tiny,small,v2-lite]
                                   [--repeats 5] [--threads 1] [--precision fp32|bf16] [--step-tokens 2048]

Tables (each prints as soon as it is measured):

- layer: one MoE layer alone (router, routed and shared experts) on --tokens rows, forward and
  backward, against a dense SwiGLU whose hidden width gives the same active matmul FLOPs, at the
  MoE layer sizes of tiny, small and DeepSeek-V2-Lite (2048 wide, 64 routed experts of 1408, 6
  active, 2 shared). Target (issue 20): this code >= 0.8x the dense SwiGLU's FLOP/s.
- step: one training step (forward, backward, AdamW, moe_balance_step) of the tiny and small
  models against a dense DeepSeek config of the same active parameters and FLOPs per token
  (n_routed_experts=0, inter_dim chosen to match), on --step-tokens tokens. Target: >= 0.9x.
- syncs: reads of device values on the host during one training step, in the model's forward and
  backward and in moe_balance_step. On a GPU, CUDA's own count (torch.cuda.set_sync_debug_mode);
  on the CPU, where nothing waits, the calls that would wait on a GPU (Tensor.item, .tolist,
  .__bool__, ...). Target: at most one per optimizer step, the trainer's read of the loss included.
  Then what that read of the loss costs: windows of steps with and without it.
- compile: torch.compile (inductor) of the whole model against eager, one training step; the
  graph breaks in one MoE block compiled through autograd, and the graphs beyond one that a short
  model's training step makes over two batches (a break or a recompilation each).

"reference" is the implementation before the experts were stacked, kept here to measure against:
per layer one host read of the token counts (`counts.tolist()`), then each expert's three matmuls
on its own slice, one expert after the other (run on the stacked weights, expert by expert).

Timing: on the CPU, the process's CPU time with --threads intra-op threads (default 1), because on
a machine other jobs share, wall time measures them too; on a GPU, wall time with the device
synchronised around each timed call. Each repeat runs every variant of a row once, in an order
rotated from one repeat to the next (paired and interleaved), after an untimed warm-up; figures are
medians with [min-max] over the repeats, and ratios are medians of the per-repeat paired ratios.
It prints figures and judges nothing but the targets it names.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from env.common.cli import ArgumentParser, run_cli
from env.machine.peaks import peak_flops
from train.benchmarks import benchmark_main
from train.config_loader import load_config
from train.errors import ConfigError
from train.models.deepseek import (
    Block,
    DeepSeekConfig,
    MoE,
    SwiGLU,
    Transformer,
    decoder_flops_per_token,
    moe_balance_step,
    rope_cache,
)

TABLES = ("layer", "step", "syncs", "compile")
LAYER_TARGET = 0.8
STEP_TARGET = 0.9
# DeepSeek-V2-Lite's MoE layer (its config.json): only the sizes matter here.
V2_LITE = DeepSeekConfig(
    dim=2048, n_routed_experts=64, n_activated_experts=6, n_shared_experts=2, moe_inter_dim=1408,
    n_expert_groups=1, n_limited_groups=1,
)  # fmt: skip
# A V2-Lite layer takes about half a minute per forward and backward on one CPU thread.
V2_LITE_CPU_REPEATS = 2
LOSS_READ_WINDOW = 10  # steps timed together in the loss-read rows
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


def layer_shapes() -> dict[str, DeepSeekConfig]:
    return {"tiny": load_config("tiny").model, "small": load_config("small").model, "v2-lite": V2_LITE}


# ---------------------------------------------------------------------------------------------
# The implementation before, as the reference


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward as it was before the experts were stacked: a host read, then expert by expert."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, indices = moe.router(x)
    counts = torch.bincount(indices.flatten(), minlength=moe.n_routed_experts)
    if moe.training and torch.is_grad_enabled():
        moe.tokens_per_expert += counts
    order = indices.flatten().argsort()
    token_of = order // indices.shape[1]
    slices = x[token_of].split(counts.tolist())
    experts = moe.experts
    parts = [
        F.linear(F.silu(F.linear(rows, w1)) * F.linear(rows, w3), w2)
        for rows, w1, w3, w2 in zip(
            slices, experts.w1.weight.unbind(0), experts.w3.weight.unbind(0), experts.w2.weight.unbind(0), strict=True
        )
    ]
    expert_out = torch.cat(parts)
    weighted = expert_out * weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
    out = torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out.view(shape)


class ReferenceMoE(MoE):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_moe(self, x)


def as_reference(model: nn.Module) -> nn.Module:
    """A copy of `model` whose MoE layers run the reference implementation on the same weights."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MoE):
            module.__class__ = ReferenceMoE
    return model


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 or bf16 (autocast)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Timer:
    device: torch.device

    @property
    def clock(self) -> str:
        return "wall time, device synchronised" if self.device.type == "cuda" else "process CPU time"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds `fn` takes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - started
        started = time.process_time()
        fn()
        return time.process_time() - started


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, timer: Timer) -> dict[str, list[float]]:
    """Seconds per repeat of each variant: one warm-up each, then every repeat runs all, in rotated order."""
    names = list(variants)
    for name in names:
        variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timer(variants[name]))
    return seconds


def spread(values: list[float], scale: float = 1.0, spec: str = ".1f") -> str:
    """Median [min-max] of values x scale."""
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):{spec}} [{min(scaled):{spec}}-{max(scaled):{spec}}]"


def paired_ratio(flops: dict[str, float], seconds: dict[str, list[float]], name: str, base: str) -> list[float]:
    """Per repeat: name's FLOP/s over base's FLOP/s."""
    return [
        (flops[name] / mine) / (flops[base] / theirs) for mine, theirs in zip(seconds[name], seconds[base], strict=True)
    ]


def verdict(ratios: list[float], target: float) -> str:
    return f"target >= {target}x: {'met' if statistics.median(ratios) >= target else 'NOT met'}"


# ---------------------------------------------------------------------------------------------
# (a) the layer alone


def moe_active_params(cfg: DeepSeekConfig) -> int:
    """Active matmul weights of one MoE layer: the router, the shared experts and the top-k routed experts."""
    return cfg.n_routed_experts * cfg.dim + 3 * cfg.dim * cfg.moe_inter_dim * (
        cfg.n_activated_experts + cfg.n_shared_experts
    )


def dense_hidden(cfg: DeepSeekConfig) -> int:
    """The width of the dense SwiGLU with the MoE layer's active matmul weights."""
    return round(moe_active_params(cfg) / (3 * cfg.dim))


def layer_table(args: argparse.Namespace, timer: Timer, precision: Precision) -> list[str]:
    print(f"\n(a) one layer, forward + backward on {args.tokens:,} tokens, {precision.name}: MoE vs dense SwiGLU")
    print(f"{'shape':8} {'variant':16} {'ms':>26} {'GFLOP/s':>22} {'vs dense':>18}  max/mean load")
    summary = []
    for name in args.shapes:
        repeats = V2_LITE_CPU_REPEATS if name == "v2-lite" and timer.device.type == "cpu" else args.repeats
        ratio = layer_rows(name, layer_shapes()[name], args.tokens, repeats, timer, precision)
        summary.append(f"layer {name} {ratio:.2f}x dense")
    return summary


def layer_rows(name: str, cfg: DeepSeekConfig, tokens: int, repeats: int, timer: Timer, precision: Precision) -> float:
    """Prints one layer size's rows; returns this code's median FLOP/s ratio to the dense SwiGLU."""
    torch.manual_seed(0)
    moe = MoE(cfg).to(timer.device)
    nn.init.normal_(moe.router.weight, std=cfg.init_std)
    for parameter in moe.experts.parameters():
        nn.init.normal_(parameter, std=cfg.init_std)
    hidden = dense_hidden(cfg)
    dense = SwiGLU(cfg.dim, hidden).to(timer.device)
    x = torch.randn(tokens, cfg.dim, device=timer.device, requires_grad=True)

    def train(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with precision.autocast(timer.device):
                out = forward(x)
            out.float().pow(2).mean().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None

        return step

    variants = {
        "dense SwiGLU": train(dense, dense),
        "MoE, this code": train(moe, moe),
        "MoE, reference": train(lambda rows: reference_moe(moe, rows), moe),
    }
    moe_flops = 6.0 * tokens * moe_active_params(cfg)
    flops = {
        "dense SwiGLU": 6.0 * tokens * 3 * cfg.dim * hidden,
        "MoE, this code": moe_flops,
        "MoE, reference": moe_flops,
    }
    seconds = interleaved(variants, repeats, timer)
    with torch.no_grad():
        counts = torch.bincount(moe.router(x)[1].flatten(), minlength=cfg.n_routed_experts).float()
    for variant in variants:
        gflops = [flops[variant] / s / 1e9 for s in seconds[variant]]
        dense_row = variant == "dense SwiGLU"
        vs = "1" if dense_row else spread(paired_ratio(flops, seconds, variant, "dense SwiGLU"), spec=".2f")
        load = "" if dense_row else f"{(counts.max() / counts.mean()).item():.2f}"
        print(f"{name:8} {variant:16} {spread(seconds[variant], 1000):>26} {spread(gflops):>22} {vs:>18}  {load}")
    ratios = paired_ratio(flops, seconds, "MoE, this code", "dense SwiGLU")
    print(
        f"{'':8} dense width {hidden} (MoE: {cfg.n_activated_experts} of {cfg.n_routed_experts} experts and "
        f"{cfg.n_shared_experts} shared, each {cfg.moe_inter_dim} wide); {repeats} repeats; "
        f"{verdict(ratios, LAYER_TARGET)}",
        flush=True,
    )
    return statistics.median(ratios)


# ---------------------------------------------------------------------------------------------
# (b) the model's training step


def dense_twin(cfg: DeepSeekConfig) -> DeepSeekConfig:
    """The dense config (no routed experts) whose one inter_dim gives the MoE model's active FFN weights."""
    blocks = cfg.n_layers + cfg.mtp_depth
    ffn = sum(
        3 * cfg.dim * cfg.inter_dim if cfg.is_dense_layer(layer) else moe_active_params(cfg) for layer in range(blocks)
    )
    return dataclasses.replace(cfg, n_routed_experts=0, inter_dim=round(ffn / (3 * cfg.dim * blocks)))


def training_step(
    model: nn.Module, tokens: torch.Tensor, precision: Precision, device: torch.device, read_loss: bool = False
) -> Callable[[], torch.Tensor]:
    """One optimizer step as the trainer takes it (AdamW, fused on CUDA; then the MoE balancing), as a function.

    read_loss: read the loss on the host before the optimizer step, as the trainer does for its
    non-finite check and stop vote.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))

    def step() -> torch.Tensor:
        with precision.autocast(device):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if read_loss:
            loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe_balance_step(model)
        return loss.detach()

    return step


def step_models(name: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, torch.Tensor, dict]:
    """(models by variant, a batch of tokens, FLOPs per step by variant) for config `name`."""
    cfg = load_config(name).model
    seq_len = cfg.max_seq_len
    if args.step_tokens % seq_len:
        raise ConfigError(f"--step-tokens {args.step_tokens} is not a multiple of {name}'s sequence length {seq_len}")
    tokens = torch.randint(0, cfg.vocab_size, (args.step_tokens // seq_len, seq_len + 1), device=device)
    torch.manual_seed(0)
    moe = Transformer(cfg).to(device)
    twin = dense_twin(cfg)
    torch.manual_seed(0)
    models = {"dense": Transformer(twin).to(device), "MoE, this code": moe, "MoE, reference": as_reference(moe)}
    per_token = {"dense": decoder_flops_per_token(twin, seq_len), "MoE": decoder_flops_per_token(cfg, seq_len)}
    flops = {variant: per_token["dense" if variant == "dense" else "MoE"] * args.step_tokens for variant in models}
    return models, tokens, flops


def step_table(args: argparse.Namespace, timer: Timer, precision: Precision) -> list[str]:
    device = timer.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, precision.name).flops
    print(f"\n(b) one training step of {args.step_tokens:,} tokens, {precision.name}: MoE model vs its dense twin")
    mfu = f" {'MFU':>8}" if peak else ""
    print(f"{'config':7} {'variant':16} {'ms':>30} {'GFLOP/s':>22} {'vs dense':>22}{mfu}")
    summary = []
    for name in ("tiny", "small"):
        models, tokens, flops = step_models(name, args, device)
        steps = {variant: training_step(model, tokens, precision, device) for variant, model in models.items()}
        seconds = interleaved(steps, args.repeats, timer)
        for variant in models:
            gflops = [flops[variant] / s / 1e9 for s in seconds[variant]]
            vs = "1" if variant == "dense" else spread(paired_ratio(flops, seconds, variant, "dense"), spec=".2f")
            used = f" {statistics.median(gflops) * 1e9 / peak:8.1%}" if peak else ""
            print(f"{name:7} {variant:16} {spread(seconds[variant], 1000):>30} {spread(gflops):>22} {vs:>22}{used}")
        twin = models["dense"].cfg
        ratios = paired_ratio(flops, seconds, "MoE, this code", "dense")
        print(f"{'':7} dense twin: inter_dim {twin.inter_dim}, {flops['dense'] / args.step_tokens / 1e6:.3f} "
              f"MFLOP/token against the MoE's {flops['MoE, this code'] / args.step_tokens / 1e6:.3f}; "
              f"{args.repeats} repeats; {verdict(ratios, STEP_TARGET)}", flush=True)  # fmt: skip
        used = {v: flops[v] / statistics.median(seconds[v]) / peak for v in models} if peak else {}
        summary.append(
            f"step {name} {statistics.median(ratios):.2f}x dense"
            + (f" (MFU {used['MoE, this code']:.1%}; reference {used['MoE, reference']:.1%})" if used else "")
        )
    return summary


# ---------------------------------------------------------------------------------------------
# (c) host syncs


@contextlib.contextmanager
def counting_host_reads(device: torch.device) -> Iterator[list[str]]:
    """Record each read of a device value on the host inside the block, by name.

    On CUDA: every synchronizing call CUDA reports (set_sync_debug_mode warns on each). On the CPU:
    every call of the Tensor methods in HOST_READS, which would wait for the device on a GPU.
    """
    seen: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.extend(str(w.message).splitlines()[0] for w in caught if "synchronizing" in str(w.message))
        return
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name: str) -> Callable[..., object]:
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            seen.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def sync_table(args: argparse.Namespace, timer: Timer, precision: Precision) -> list[str]:
    device = timer.device
    how = "CUDA's synchronizing calls" if device.type == "cuda" else "Tensor.item/.tolist/.__bool__/... calls"
    print(f"\n(c) host reads per training step ({how}), {precision.name}")
    print(f"{'config':7} {'variant':16} {'forward+backward':>17} {'moe_balance_step':>17}  which")
    summary = []
    for name in ("tiny", "small"):
        counted = {}
        models, tokens, _ = step_models(name, args, device)
        for variant in ("MoE, reference", "MoE, this code"):
            model = models[variant]
            training_step(model, tokens, precision, device)()  # warm-up: lazy initialisation is not a step's
            with counting_host_reads(device) as in_model:
                with precision.autocast(device):
                    loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
            with counting_host_reads(device) as in_balance:
                moe_balance_step(model)
            reads = in_model + in_balance
            which = ", ".join(f"{n} x{reads.count(n)}" for n in sorted(set(reads))) or "-"
            print(f"{name:7} {variant:16} {len(in_model):>17} {len(in_balance):>17}  {which}", flush=True)
            counted[variant] = len(reads)
        summary.append(f"syncs {name} {counted['MoE, this code']} (reference {counted['MoE, reference']})")
    print("the trainer adds one per step: its read of the summed loss and stop votes (train/trainer.py train_step)")
    return summary + loss_read_rows(args, timer, precision)


def loss_read_rows(args: argparse.Namespace, timer: Timer, precision: Precision) -> list[str]:
    """What the trainer's per-step read of the loss costs: windows of LOSS_READ_WINDOW steps with and without it.

    Timed as whole windows (the device synchronised at their ends only), so that a read that stops
    the host from queueing the next step ahead shows. On the CPU nothing runs ahead, and tiny only
    (a window of small takes minutes there).
    """
    print(f"cost of that read: windows of {LOSS_READ_WINDOW} steps of this code, paired; per step")
    summary = []
    for name in ("tiny", "small") if timer.device.type == "cuda" else ("tiny",):
        models, tokens, _ = step_models(name, args, timer.device)
        model = models["MoE, this code"]
        windows = {
            f"read {'each step' if read else 'never'}": window(
                training_step(model, tokens, precision, timer.device, read_loss=read)
            )
            for read in (True, False)
        }
        seconds = interleaved(windows, args.repeats, timer)
        extra = [
            (a - b) / LOSS_READ_WINDOW for a, b in zip(seconds["read each step"], seconds["read never"], strict=True)
        ]
        base = statistics.median(seconds["read never"]) / LOSS_READ_WINDOW
        without = spread(seconds["read never"], 1000 / LOSS_READ_WINDOW)
        added = f"{spread(extra, 1000, '+.2f')} ms with it ({statistics.median(extra) / base:+.1%})"
        print(f"{name:7} {without} ms without the read, {added}", flush=True)
        summary.append(f"loss read {name} {statistics.median(extra) / base:+.1%}")
    return summary


def window(step: Callable[[], object]) -> Callable[[], None]:
    def steps() -> None:
        for _ in range(LOSS_READ_WINDOW):
            step()

    return steps


# ---------------------------------------------------------------------------------------------
# (d) torch.compile


def graph_breaks(cfg: DeepSeekConfig, device: torch.device) -> tuple[int, list[str]]:
    """(graph breaks, their reasons) in one MoE block's training forward, compiled through autograd.

    Counted from the graphs dynamo makes with the aot_eager backend, forward and backward run: a
    break that only tracing with fake tensors through autograd finds (data-dependent sizes) counts
    too, which torch._dynamo.explain alone misses on torch 2.4.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    block = Block(cfg, layer_id=cfg.n_dense_layers).to(device)
    nn.init.normal_(block.ffn.router.weight, std=cfg.init_std)  # torch.empty until Transformer.init_weights
    x = torch.randn(2, 16, cfg.dim, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in rope_cache(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta))
    torch._dynamo.reset()
    counters.clear()
    torch.compile(block, backend="aot_eager")(x, cos, sin).sum().backward()
    reasons = [*counters["graph_break"], *counters["unimplemented"]]
    return counters["stats"]["unique_graphs"] - 1, sorted(
        {re.sub(r'"[^"]*/', '"', " ".join(r.split())) for r in reasons}
    )


def model_graph_breaks(cfg: DeepSeekConfig, device: torch.device) -> int:
    """Graph breaks in the whole model's training forward and backward (aot_eager), over two batches
    that route differently: a recompilation for the second counts as a graph too."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg, n_layers=cfg.n_dense_layers + 2)).to(device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (2, 33), device=device)
        compiled(tokens[:, :-1], tokens[:, 1:]).backward()
    return counters["stats"]["unique_graphs"] - 1


def compile_table(args: argparse.Namespace, timer: Timer, precision: Precision) -> list[str]:
    import torch._dynamo

    print(
        f"\n(d) torch.compile (inductor) vs eager, one training step of {args.step_tokens:,} tokens, {precision.name}"
    )
    for name in ("tiny", "small"):
        cfg = load_config(name).model
        breaks, reasons = graph_breaks(cfg, timer.device)
        print(f"{name}: graph breaks in one MoE block: {breaks}" + "".join(f"\n  {reason}" for reason in reasons))
        print(f"{name}: graphs beyond one in the model's training step ({cfg.n_dense_layers} dense and 2 MoE "
              f"layers, two batches): {model_graph_breaks(cfg, timer.device)}")  # fmt: skip
    print(f"{'config':7} {'variant':10} {'compile s':>10} {'ms':>30} {'vs eager':>22}")
    summary = []
    for name in ("tiny", "small"):
        models, tokens, _ = step_models(name, args, timer.device)
        eager = models["MoE, this code"]
        # A fresh start, as a training run has: after an earlier compilation of the same forward (the graph
        # counts above, the config before), dynamo would recompile with dynamic shapes, a slower graph.
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(eager))
        steps = {"eager": training_step(eager, tokens, precision, timer.device)}
        compiled_step = training_step(compiled, tokens, precision, timer.device)
        started = time.perf_counter()
        compiled_step()  # compiles forward and backward
        compile_s = time.perf_counter() - started
        steps["compiled"] = compiled_step
        seconds = interleaved(steps, args.repeats, timer)
        speedup = [e / c for e, c in zip(seconds["eager"], seconds["compiled"], strict=True)]
        print(f"{name:7} {'eager':10} {'':>10} {spread(seconds['eager'], 1000):>30} {'1':>22}")
        print(f"{name:7} {'compiled':10} {compile_s:10.0f} {spread(seconds['compiled'], 1000):>30} "
              f"{spread(speedup, spec='.2f'):>22}", flush=True)  # fmt: skip
        summary.append(f"compiled {name} {statistics.median(speedup):.2f}x eager")
    return summary


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.moe", description=__doc__.split("\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES[:3]), help=f"some of {','.join(TABLES)} (default: "
                        f"{','.join(TABLES[:3])})")  # fmt: skip
    parser.add_argument("--shapes", default="tiny,small,v2-lite", help="layer sizes of table layer")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of table layer (default: 4096)")
    parser.add_argument("--step-tokens", type=int, default=2048, help="tokens per training step (default: 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default: 1)")
    parser.add_argument("--precision", default="", help="fp32 (the CPU's default) or bf16 (a GPU's default)")
    args = parser.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    args.shapes = [s for s in args.shapes.split(",") if s]
    for given, known, flag in ((args.tables, TABLES, "--tables"), (args.shapes, tuple(layer_shapes()), "--shapes")):
        unknown = [value for value in given if value not in known]
        if unknown or not given:
            raise ConfigError(f"{flag} {','.join(unknown) or '(none)'}: choose among {','.join(known)}")
    for value, flag in ((args.tokens, "--tokens"), (args.step_tokens, "--step-tokens"), (args.repeats, "--repeats"),
                        (args.threads, "--threads")):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    if args.precision not in ("", "fp32", "bf16"):
        raise ConfigError(f"--precision {args.precision} is not fp32 or bf16")
    return args


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    precision = Precision(args.precision or ("bf16" if device.type == "cuda" else "fp32"))
    torch.set_num_threads(args.threads)
    timer = Timer(device)
    threads = f", {args.threads} CPU thread(s)" if device.type == "cpu" else f", {torch.cuda.get_device_name(device)}"
    print(f"moe benchmark · torch {torch.__version__} · {device}{threads} · {timer.clock} · "
          f"{args.repeats} repeats, median [min-max]")  # fmt: skip
    tables = {"layer": layer_table, "step": step_table, "syncs": sync_table, "compile": compile_table}
    summary = [line for name in args.tables for line in tables[name](args, timer, precision)]
    print(f"\nsummary: {'; '.join(summary)}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("moe-benchmark", main)
