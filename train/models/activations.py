"""What a forward keeps for its backward, from a model's config alone: the figures a spec's `saved_for_backward`
returns (train/models/spec.py), and the saved tensors of the operations the families share, per token.

A figure is the bytes of the storages autograd keeps between the forward and the backward (what
torch.autograd.graph.saved_tensors_hooks is handed), each storage once: a view kept beside its base costs
nothing more. Parameters, buffers and autocast's low-precision copies of the weights are not in it (the plan
counts those from the model itself). train/benchmarks/plan.py measures the figures against a real forward.

How dtypes decide the figures (`Setting`): matmuls produce the compute dtype (autocast's, else the
parameters'); the residual stream and every norm's output have the parameters' dtype as the forward reads
them (float32, or bf16 under FSDP2's mixed precision); norm statistics, router scores and the loss's
log-probabilities are float32 whatever the others are. Under autocast with float32 parameters each matmul
casts its input itself, and each cast is kept: an input read by three projections is kept three times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP32 = 4
INDEX = 8  # int64 indices: embedding lookups, targets, routing
MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class Setting:
    """How a forward runs, as far as what it keeps depends on it: dtypes, device, and what trains.

    A matmul keeps its input for its weight's gradient, and a norm its normalised input for its weight's: a
    frozen weight (a LoRA run's base) keeps neither, unless an adapter on that matmul reads the input (and keeps
    its own rank-wide intermediate). Names are a block's modules as the model names them (attn.wq,
    ffn.experts.w1, attn_norm); `adapters` holds LoRA's targets, matched as PEFT's target_modules list is: a
    name equal to a target or ending in "." + target.
    """

    compute: int  # bytes per number of matmul outputs: autocast's dtype, else the parameters'
    params: int  # of the parameters as the forward reads them; the residual stream and norm outputs have it
    device: str = "cuda"  # scaled_dot_product_attention's kernels differ (fused_attention)
    frozen_base: bool = False
    adapters: tuple[str, ...] = ()
    adapter_rank: int = 0

    @property
    def casts(self) -> bool:
        """Autocast casts a params-dtype input for every matmul that reads it, and each matmul keeps its cast."""
        return self.compute != self.params

    def adapted(self, name: str) -> bool:
        return any(name == target or name.endswith(f".{target}") for target in self.adapters)

    def trains(self, name: str) -> bool:
        """Whether the module's weight, or an adapter on it, gets a gradient."""
        return not self.frozen_base or self.adapted(name)

    def matmul_inputs(self, width: int, *readers: str) -> float:
        """Bytes per token the matmuls `readers` keep of one params-dtype input of `width` numbers, with their
        adapters' intermediates."""
        keeping = sum(self.trains(reader) for reader in readers)
        adapters = sum(self.adapted(reader) for reader in readers) * self.adapter_rank * self.compute
        return width * self.compute * min(keeping, keeping if self.casts else 1) + adapters


@dataclass(frozen=True)
class Unit:
    """Bytes per sample one checkpointable unit (a block) keeps for the backward."""

    kept: float  # without checkpointing
    inputs: float  # what full checkpointing keeps: the unit's inputs
    selective: float  # with its selective part recomputed: the rest, and that part's inputs


@dataclass(frozen=True)
class Activations:
    """Bytes per sample a forward keeps for the backward, unit by unit and outside the units."""

    units: tuple[Unit, ...]
    outside: float  # never checkpointed: the embedding lookup, the final norm, the output head and the loss

    def kept(self, mode: str) -> float:
        """Held from the forward to the backward under train.activation_checkpointing=mode."""
        per_unit = {"none": lambda u: u.kept, "full": lambda u: u.inputs, "selective": lambda u: u.selective}[mode]
        return self.outside + sum(per_unit(unit) for unit in self.units)

    def recomputed(self, mode: str) -> float:
        """Held on top during the backward of one unit: what its recompute keeps again (the largest unit's)."""
        extra = {
            "none": lambda u: 0.0,
            "full": lambda u: u.kept - u.inputs,
            "selective": lambda u: u.kept - u.selective,
        }
        return max((extra[mode](unit) for unit in self.units), default=0.0)


def rms_norm(width: int, given: int, trains: bool, float_copies: int = 1, storage: int = 0) -> float:
    """RMSNorm of `width` numbers of `given` bytes: its float32 input (the input itself when it is float32, whose
    storage may be wider than the slice normalised: `storage`; else `float_copies` casts, one per `.float()`
    the norm calls), the reciprocal root, and, when its weight trains, the normalised input in the given dtype."""
    x32 = (storage or width) * FP32 if given == FP32 else float_copies * width * FP32
    return x32 + FP32 + width * given * trains


def swiglu_inner(hidden: int, dt: Setting, w2: str) -> float:
    """w2(silu(w1 x) * w3 x) without its input: w1 x, w3 x, silu(w1 x), and their product (w2's input)."""
    return 3 * hidden * dt.compute + dt.matmul_inputs(hidden, w2)


def fused_attention(device: str, qk_dim: int, v_dim: int) -> bool:
    """Whether scaled_dot_product_attention runs a fused kernel (flash or memory-efficient), which keeps no
    seq x seq scores: always on CUDA; on the CPU only when queries/keys and values have one head size."""
    return device == "cuda" or qk_dim == v_dim


def attention_core(
    heads: int, qk_dim: int, v_dim: int, seq_len: int, dt: Setting, value_storage: float, out_proj: str
) -> float:
    """scaled_dot_product_attention and the output projection `out_proj` reading its output, per token.

    Fused kernels keep q, k, v (`value_storage`: numbers per token of the storage v is a view of), the output
    (which the output projection reads as a view) and the float32 log-sum-exp per head. The math kernel keeps
    the scaled q and k, the softmax probabilities (seq numbers per head) and a contiguous v; the output
    projection then reads (and keeps, if it trains) a copy of the output; newer torch keeps those in float32
    (math_attention_bytes).
    """
    adapter = dt.matmul_inputs(0, out_proj)  # only an adapter's intermediate: the input is counted here
    if fused_attention(dt.device, qk_dim, v_dim):
        return (2 * heads * qk_dim + value_storage + heads * v_dim) * dt.compute + heads * FP32 + adapter
    kept = math_attention_bytes(dt.compute)
    return heads * (2 * qk_dim + seq_len + v_dim) * kept + dt.matmul_inputs(heads * v_dim, out_proj)


def math_attention_bytes(compute: int) -> int:
    """Bytes per number the math kernel computes in: float32 for bf16/fp16 inputs where torch has the switch
    torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed and it is off (the default of the torch releases
    that have it), else the inputs' own."""
    allowed = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    return FP32 if allowed is not None and not allowed() else compute
