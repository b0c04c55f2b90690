"""The run configuration's schema: the sections of a config file as dataclasses, and nothing else.

A config file (train/configs/*.yaml, or any YAML path) has up to three sections, `model`, `data` and
`train`. `data` and `train` are the dataclasses below. `model` is the config class of the model that
`model.arch` names: a subclass of ModelConfig that lives beside its model in train/models/ (the
registry's spec names it). Every field has a docstring: `make keys` prints them, docs/config.md is
that print, and an unknown key's "did you mean" reads them.

Choices are `Literal` types; a field whose change would break an exact resume carries RESUME_FIXED in
its metadata (every model key is fixed: the weights have that shape). Reading files and overrides,
checking values and resolving what the data decides is train/config_loader.py's job; this module
imports nothing of the project, so everything in train/ can stand on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Field metadata of keys whose change breaks an exact resume (train/checkpoint/resume.py).
RESUME_FIXED = {"resume": "fixed"}
# model.vocab_size=auto is stored as this until the data (train/data/sources.py) gives the size.
VOCAB_AUTO = 0
# The model a config without model.arch trains.
DEFAULT_ARCH = "deepseek"


@dataclass
class ModelConfig:
    """The `model:` section. `arch` names a registered model (train/models/); that model's config class,
    a subclass of this one, holds the rest (DeepSeekConfig in train/models/deepseek.py, or your own).
    Every model key is fixed for a resume."""

    arch: str = DEFAULT_ARCH
    """The model family: a name registered in train/models (deepseek, llama, resnet50, or a plugin's)."""


@dataclass
class DataConfig:
    """The `data:` section: what trains and what validates."""

    source: Literal["corpus", "synthetic", "files", "images"] = field(default="corpus", metadata=RESUME_FIXED)
    """corpus: the built-in byte-level text (the running Python's standard library); synthetic: random tokens or
    images (benchmarks); files: data.path's text or prepared token files; images: an ImageFolder tree. A data.path
    given with the default source picks files or images from the path."""
    path: str = field(default="", metadata=RESUME_FIXED)
    """A text glob (each byte a token), a prepared token file (.bin, from make prepare), or an image folder."""
    seq_len: int = field(default=256, metadata=RESUME_FIXED)
    """Tokens per training sample (the context length trained); at most the model's max_seq_len."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 loads in the training process (enough for token data)."""
    pin_memory: bool = True
    """Pin host batches for faster copies to the GPU (ignored on the CPU)."""
    val_fraction: float = field(default=0.05, metadata=RESUME_FIXED)
    """Share of the samples held out for validation (the tail of a token source), never trained on whatever the
    seed or world size; 0 holds none out and turns evaluation off."""
    val_path: str = field(default="", metadata=RESUME_FIXED)
    """A separate validation set (a text glob or token file, like data.path); then all of data.path trains."""


@dataclass
class LoRAConfig:
    """The `train.lora:` section: low-rank adapters on a frozen base (train/lora.py), saved in PEFT's format."""

    rank: int = field(default=0, metadata=RESUME_FIXED)
    """The adapters' rank r; 0 turns LoRA off (every parameter trains). At most the smaller dimension of each
    adapted matrix. With LoRA on, every base parameter is frozen and the optimizer holds only the adapters."""
    alpha: float = 16.0
    """The adapters' scale is alpha / rank (PEFT's lora_alpha): y = W x + alpha / r * B A dropout(x)."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (PEFT's lora_dropout); 0 turns it off."""
    targets: list[str] = field(default_factory=list, metadata=RESUME_FIXED)
    """The modules adapted, PEFT's target_modules: a module named so, or whose name ends in "." + it (wq adapts
    every layers.N.attn.wq); a name of a module holding linear layers adapts each of them (experts: the routed
    experts, stacked, one adapter per expert; shared_experts). Empty: the model family's attention projections
    (deepseek: wq, wq_a, wq_b, wkv_a, wkv_b, wo; llama: wq, wk, wv, wo). On the command line a comma list."""


@dataclass
class TrainConfig:
    """The `train:` section: the optimisation, the parallelism, and what the run writes."""

    steps: int = 200
    """Optimizer steps the run trains to (a resumed run continues to this step)."""
    micro_batch: int = 8
    """Samples per rank per forward (the per-GPU batch size); lower it, raising accum, when memory runs out."""
    accum: int = 1
    """Micro-batches accumulated per optimizer step: the global batch is ranks x micro_batch x accum."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after the linear warmup."""
    min_lr: float = 1e-4
    """The learning rate the cosine schedule decays to."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup from 0 to train.lr."""
    lr_decay_steps: int = 0
    """Steps over which the cosine decays to min_lr; 0 means train.steps. Set it to stop a run early on the
    schedule of a longer one (resuming later continues exactly)."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices and embeddings (norms, biases and balancing vectors get none)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Largest global gradient norm; larger gradients are scaled down to it."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast precision: auto picks bf16 where the GPU supports it, else fp32; fp16 adds a gradient scaler."""
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata=RESUME_FIXED)
    """Data parallelism: ddp replicates the model on every rank, fsdp (FSDP2) shards parameters, gradients and
    optimizer states per block."""
    grad_compression: Literal["none", "bf16", "fp16"] = "none"
    """DDP's gradient compression on the wire (halves the bytes on PCIe boxes without NVLink)."""
    bucket_cap_mb: int = 25
    """DDP's gradient bucket size in MiB."""
    tf32: bool = True
    """Let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer)."""
    compile: bool = False
    """torch.compile the model. Off by default: on a CPU the compile pays for itself only after many steps, and no
    GPU has measured it yet (docs/moe-speed.md has the figures)."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """torch.compile's backend: inductor generates fused kernels; aot_eager traces and runs the same forward and
    backward graphs without generating code (cheap: for tests and for debugging a compile)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward instead of keeping them (train/activation_checkpointing.py): none
    keeps everything; full keeps only each block's input and recomputes the block; selective recomputes only the
    part of each block that keeps the most bytes per FLOP of recompute (DeepSeek and Llama: the feed-forward, MoE
    or dense). Losses and gradients are unchanged; make plan shows what each saves."""
    seed: int = field(default=1337, metadata=RESUME_FIXED)
    """Seeds the weights, the sample order and every RNG of the run."""
    log_every: int = 10
    """Steps between metrics rows (and console lines); the first and last steps are always logged."""
    ckpt_every: int = 100
    """Steps between checkpoints; the last step (and a stop request) always saves."""
    keep_ckpts: int = 3
    """Newest checkpoints kept; older ones are pruned once a newer one is verified."""
    first_timeout_s: float = 60.0
    """Timeout of joining the process group and of the first collective: a setup problem fails fast."""
    timeout_s: float = 600.0
    """Timeout of every later collective (a hung rank is named by the watchdog)."""
    sinks: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    """Where the figures go (train/sinks/): console, jsonl (metrics.jsonl, always kept), tensorboard, wandb, mlflow;
    on the command line a comma list, e.g. train.sinks=console,jsonl,wandb. WANDB_PROJECT (unless WANDB_MODE=disabled)
    and MLFLOW_TRACKING_URI in the environment add wandb and mlflow to the list (docs/training.md#trackers)."""
    eval_every: int = 100
    """Validation every this many steps and at the last step (0 turns it off): val_loss in metrics.jsonl, the
    console and summary.json. It never changes the training figures."""
    eval_batches: int = 20
    """Batches of ranks x micro_batch validation samples per evaluation; 0 means the whole split."""
    init_from: str = ""
    """Fine-tuning: start from the weights of a Hugging Face model directory (make export's, or a transformers
    checkpoint: deepseek_v2, deepseek_v3, llama), an export of an earlier release, or a run directory's newest
    valid checkpoint, with a fresh optimizer and schedule. The model is the source's: model.* keys given must
    agree with it. Ignored when this run resumes from its own checkpoint."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA fine-tuning: adapters on a frozen base (train.lora.rank > 0), in PEFT's format (docs/fine-tuning.md)."""


@dataclass
class RunConfig:
    """A whole run: its name and the three sections."""

    name: str = "tiny"
    """The run's name: its directory under runs/ unless RUN_DIR is given (a plain name, no '/')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config tree (RunConfig.to_dict()) as its dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def resume_fixed_keys(section: Any = None, prefix: str = "", fixed: bool = False) -> set[str]:
    """The data.* and train.* keys marked RESUME_FIXED, or under a nested section so marked (without a section:
    both sections'); every model.* key is fixed as well, by train/checkpoint/resume.py's own rule."""
    if section is None:
        return resume_fixed_keys(DataConfig(), "data.") | resume_fixed_keys(TrainConfig(), "train.")
    keys: set[str] = set()
    for f in dataclasses.fields(section):
        value, own = getattr(section, f.name), fixed or f.metadata == RESUME_FIXED
        if dataclasses.is_dataclass(value):
            keys |= resume_fixed_keys(value, f"{prefix}{f.name}.", own)
        elif own:
            keys.add(f"{prefix}{f.name}")
    return keys
