"""Validation: the held-out loss during training (Evaluator) and of a saved run (`make eval`).

The loss is the mean next-token cross-entropy (nats per target token; the main head only, no
MTP term) over the first n samples of the validation split (train/data/split.py), n = eval_batches x
world_size x micro_batch, or the whole split with eval_batches=0. For masked data (chat) the target
tokens are those the training loss counts (the assistant's), val_bpb is per byte of them, and
val_loss is NaN when the samples count none. Eval batch b is those positions
from b*G on (G = world_size x micro_batch), rank r taking micro_batch of them, the last batch
padded with weight-0 samples so that every rank runs the same forwards (FSDP gathers in each).
Each rank sums its samples' losses in float64 and one all-reduce adds them up, so the figure is
the same on any world size with the same G, to the order of the float32 reductions inside a
sample's forward.

Figures: val_loss; val_bpb (bits per byte of text) where each token's bytes are known, i.e. byte
data or a byte-level tokenizer; val_perplexity (exp val_loss) for tokenized data.

Evaluation never changes training: no gradient, MoE load counters untouched (they count only in
training mode with gradients), the model's train/eval mode and every RNG restored, and the
training data iterator is not touched.

    python -m train.eval --run-dir RUN_DIR [--data PATH] [--gpus N]   (make eval RUN_DIR=… [DATA=…])

evaluates the newest valid checkpoint of RUN_DIR (DDP or FSDP) on the run's validation split, or
on the whole of PATH (a token file, or text, tokenized with the run's tokenizer), and writes
RUN_DIR/eval.json. RUN_DIR may also be a directory of weights alone (make export's, or a Hugging Face
checkpoint): it holds no validation split, so DATA is needed; samples are data.seq_len tokens as the
exported run trained them (its torchrig.json), else min(the model's max_seq_len, EXPORT_SEQ_LEN), one per
forward; one process unless GPUS says more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from env.common.atomic import write_text_atomically
from env.common.cli import ArgumentParser, UserError, check_workers, count_arg, run_cli
from env.rig.launch import launch
from train.checkpoint import EveryCheckpointDamaged
from train.config import RunConfig
from train.config_loader import config_from_dict
from train.data import build_dataset, data_tokenizer, validation_set
from train.data.sources import TokenWindows, token_mask
from train.data.text import document_chunks, expand_globs
from train.data.tokens import BYTE_VOCAB, read_token_file
from train.distributed import DistInfo, all_reduce_sum, backstop_timeout, connect_store, init_distributed, shutdown
from train.errors import ConfigError, DataError
from train.hf.tokenizer_files import is_byte_tokenizer
from train.models import get_spec
from train.models.loss import IGNORE_INDEX
from train.prepare import encode_files
from train.run import Precision, Run, device_settings
from train.tokenizer import RUN_TOKENIZER_NAME, load_tokenizer, sha256_of, token_byte_lengths
from train.weights import build_loaded_model, is_weights_directory, model_config, saved_config

EVAL_RECORD = "eval.json"
# Sample length for weights whose training context is unknown (a transformers checkpoint): long enough for a
# meaningful loss, short enough that one sample's activations fit beside a large model.
EXPORT_SEQ_LEN = 2048


class EvalError(UserError):
    """`make eval` cannot evaluate this run: one line with the fix."""


def eval_positions(n: int, batch: int, rank: int, world_size: int, micro_batch: int) -> tuple[list[int], list[float]]:
    """Positions (into the n evaluated samples) and weights of `rank` in eval batch `batch`; padding has weight 0."""
    first = batch * world_size * micro_batch + rank * micro_batch
    positions = list(range(first, first + micro_batch))
    return [p if p < n else 0 for p in positions], [1.0 if p < n else 0.0 for p in positions]


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Leave the model's modes and every RNG as they were, whatever happens inside."""
    modes = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    n_samples: int,
    rank: int,
    world_size: int,
    micro_batch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    all_reduce: Callable[[torch.Tensor], None],
    byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """The validation figures of the first n_samples of `indices` (see the module docstring); same on every rank."""
    # [loss sum in nats, target tokens, target bytes], all samples of all ranks
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches = math.ceil(n_samples / (world_size * micro_batch))
    with preserved_training_state(model):
        for batch in range(batches):
            positions, weights = eval_positions(n_samples, batch, rank, world_size, micro_batch)
            samples = [dataset[int(indices[p])] for p in positions]
            inputs = torch.stack([torch.as_tensor(s[0]) for s in samples]).to(device)
            targets = torch.stack([torch.as_tensor(s[1]) for s in samples]).to(device)
            weight = torch.tensor(weights, dtype=torch.float64, device=device)
            with autocast():
                logits = model(inputs)
            token_losses = F.cross_entropy(
                logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            )
            per_sample = token_losses.view(len(positions), -1).double()
            counted = targets != IGNORE_INDEX  # masked data (chat): only the tokens the mask counts
            totals[0] += (per_sample.sum(dim=1) * weight).sum()
            totals[1] += (counted.sum(dim=1).double() * weight).sum()
            if byte_lengths is not None:
                totals[2] += ((byte_lengths[targets.clamp(min=0)] * counted).sum(dim=1) * weight).sum()
    all_reduce(totals)
    loss_sum, tokens, text_bytes = totals.tolist()
    figures = {"val_loss": loss_sum / tokens if tokens else math.nan}
    if byte_lengths is not None and text_bytes > 0:
        figures["val_bpb"] = loss_sum / text_bytes / math.log(2)
    if byte_lengths is None or len(byte_lengths) > BYTE_VOCAB:
        figures["val_perplexity"] = math.exp(min(figures["val_loss"], 700.0))
    return figures


def byte_lengths_for(cfg: RunConfig, tokenizer_path: Path | None, device: torch.device) -> torch.Tensor | None:
    """Bytes of text per token id: ones for byte data, the tokenizer's table, or None when unknown."""
    if get_spec(cfg.model.arch).inputs != "tokens":
        return None
    if tokenizer_path is None:
        if cfg.data.source == "synthetic" or cfg.model.vocab_size > BYTE_VOCAB:
            return None
        return torch.ones(cfg.model.vocab_size, dtype=torch.float64, device=device)
    lengths = token_byte_lengths(load_tokenizer(tokenizer_path))
    if lengths is None:
        return None
    table = torch.zeros(max(cfg.model.vocab_size, len(lengths)), dtype=torch.float64)
    table[: len(lengths)] = torch.tensor(lengths, dtype=torch.float64)
    return table.to(device)


def record_tokenizer(cfg: RunConfig, run_dir: Path, is_main: bool) -> Path | None:
    """Copy the data's tokenizer to RUN_DIR/tokenizer.json (where sample and eval look); its path, or None for bytes."""
    source = data_tokenizer(cfg)
    if source is None:
        return None
    target = run_dir / RUN_TOKENIZER_NAME
    if is_main and not (target.is_file() and sha256_of(target) == sha256_of(source)):
        write_text_atomically(target, source.read_text(encoding="utf-8"))
    return target


class Evaluator:
    """The loop's validation: `after_step` evaluates on eval steps and returns the figures to log."""

    def __init__(self, run: Run, run_dir: Path, dataset: Dataset) -> None:
        cfg, info = run.cfg, run.info
        self.run = run
        # data.val_fraction=0 without data.val_path holds nothing out: there is nothing to evaluate on.
        self.every = cfg.train.eval_every if cfg.data.val_fraction or cfg.data.val_path else 0
        tokenizer = record_tokenizer(cfg, run_dir, info.is_main)
        if not self.every:
            return
        self.dataset, self.indices = validation_set(dataset, cfg)
        self.n_samples = check_eval_size(cfg, len(self.indices), info.world_size)
        self.byte_lengths = byte_lengths_for(cfg, tokenizer, info.device)

    def after_step(self, step: int, stopping: bool) -> dict[str, float]:
        """{} on other steps; on eval steps the validation figures (the loop leaves their time out of step_ms).

        Not when stopping: a preempted job saves its checkpoint first, within the grace period.
        """
        if not self.every or stopping or not (step % self.every == 0 or step == self.run.cfg.train.steps):
            return {}
        run = self.run
        # Under torch.compile, the eager module: a no-grad eval-mode graph would be a second compilation.
        model = getattr(run.model, "_orig_mod", run.model)
        return run_evaluation(
            model, run.cfg, run.info, run.precision, self.dataset, self.indices, self.n_samples, self.byte_lengths
        )


def check_eval_size(cfg: RunConfig, available: int, world_size: int) -> int:
    """The number of samples an evaluation reads; DataError when the split holds less than one eval batch."""
    batch = world_size * cfg.train.micro_batch
    if available < batch:
        where = (
            f"data.val_path={cfg.data.val_path!r}"
            if cfg.data.val_path
            else f"data.val_fraction={cfg.data.val_fraction}"
        )
        raise DataError(
            f"train.eval_every={cfg.train.eval_every} needs a validation split of at least one batch "
            f"({world_size} x {cfg.train.micro_batch} = {batch} samples), but {where} gives {available}; "
            "raise data.val_fraction, give data.val_path, or set train.eval_every=0"
        )
    return available if not cfg.train.eval_batches else min(available, cfg.train.eval_batches * batch)


def run_evaluation(
    model: nn.Module,
    cfg: RunConfig,
    info: DistInfo,
    precision: Precision,
    dataset: Dataset,
    indices: np.ndarray,
    n_samples: int,
    byte_lengths: torch.Tensor | None,
) -> dict[str, float]:
    return evaluate(
        model,
        dataset,
        indices,
        n_samples=n_samples,
        rank=info.rank,
        world_size=info.world_size,
        micro_batch=cfg.train.micro_batch,
        device=info.device,
        autocast=lambda: precision.autocast(info.device),
        all_reduce=all_reduce_sum,
        byte_lengths=byte_lengths,
    )


# ------------------------------------------------------------------------------ make eval


def newest_checkpoint_layout(run_dir: Path) -> dict[str, Any]:
    """world_size and strategy of the newest checkpoint sidecar; EvalError when RUN_DIR has none."""
    sidecars = sorted((run_dir / "checkpoints").glob("step-*.json"), reverse=True)
    for sidecar in sidecars:
        try:
            layout = json.loads(sidecar.read_text())
            return {"world_size": int(layout["world_size"]), "strategy": str(layout["strategy"])}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    train = f"make train RUN_DIR={shlex.quote(str(run_dir))}"
    raise EvalError(f"{run_dir} has no checkpoint to evaluate; train first ({train})")


def run_config(run_dir: Path) -> RunConfig:
    """The config the run trained with, from its manifest."""
    path = run_dir / "manifest.json"
    try:
        tree = json.loads(path.read_text()).get("config")
        if not isinstance(tree, dict):
            raise ValueError("no config in it")
        return config_from_dict(tree)
    except (OSError, ValueError, AttributeError, ConfigError) as exc:
        raise EvalError(
            f"cannot read the run's config from {path} ({exc}); is {run_dir} a make train RUN_DIR?"
        ) from None


def weights_config(run_dir: Path, data: str) -> RunConfig:
    """The config to evaluate a directory of weights alone with (see the module docstring)."""
    if not data:
        raise EvalError(f"{run_dir} holds weights without a validation split; give DATA=… (a token file or text files)")
    try:
        tree = saved_config(run_dir)
        model = model_config(tree, run_dir)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    limit = get_spec(model.arch).seq_len_limit
    recorded = (tree.get("data") or {}).get("seq_len")
    cfg = RunConfig(name=run_dir.name, model=model)
    if recorded or limit:
        cfg.data.seq_len = recorded or min(getattr(model, limit), EXPORT_SEQ_LEN)
    cfg.data.source, cfg.data.path, cfg.train.micro_batch = "files", data, 1
    return cfg


def eval_config(run_dir: Path, data: str) -> RunConfig:
    """A run's own config (its manifest), or weights_config for a directory of weights alone."""
    try:
        weights_only = is_weights_directory(run_dir)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    return weights_config(run_dir, data) if weights_only else run_config(run_dir)


def run_tokenizer(run_dir: Path) -> Path | None:
    """RUN_DIR's tokenizer.json, or None for bytes (an export of a byte-level run holds the byte tokenizer)."""
    tokenizer = run_dir / RUN_TOKENIZER_NAME
    return tokenizer if tokenizer.is_file() and not is_byte_tokenizer(tokenizer) else None


def _data_dataset(cfg: RunConfig, data: str, tokenizer: Path | None) -> tuple[Dataset, np.ndarray]:
    """The whole of DATA as token windows: a token file as it is, text through the run's tokenizer (or as bytes)."""
    mask = None
    if data.endswith(".bin"):
        tokens, meta = read_token_file(data)
        mask = token_mask(data, meta, cfg.data.seq_len, "the run's data.seq_len")
        recorded = (meta.get("tokenizer") or {}).get("sha256")
        if tokenizer is not None and recorded and recorded != sha256_of(tokenizer):
            raise EvalError(
                f"DATA={data} was made with another tokenizer than the run's {tokenizer}; prepare it with that one"
            )
    else:
        files = expand_globs([data], "DATA", "check the path and quote globs")
        if tokenizer is None:
            tokens = np.concatenate(list(document_chunks(files)))
        else:
            tokens = np.concatenate(list(encode_files(files, load_tokenizer(tokenizer))))
    if len(tokens) and int(tokens.max()) >= cfg.model.vocab_size:
        raise EvalError(
            f"DATA={data} holds token id {int(tokens.max())}, beyond the model's vocab_size={cfg.model.vocab_size}"
        )
    dataset = TokenWindows(tokens, cfg.data.seq_len, "files", data, mask)
    return dataset, np.arange(len(dataset), dtype=np.int64)


def worker(run_dir: Path, data: str) -> dict[str, Any]:
    """One eval process (torchrun started it): the newest valid checkpoint's weights, evaluated; the figures.

    A reader: it builds the model and its weights alone (train.weights, any strategy and world size the
    checkpoint was saved with), never the training state, and writes nothing into checkpoints/.
    """
    cfg = eval_config(run_dir, data)
    store = connect_store(backstop_timeout(cfg))
    info = init_distributed(cfg, run_dir, store)
    try:
        device_settings(cfg, info.device)
        precision = Precision.resolve(cfg.train.precision, info.device)
        try:
            model, _, step = build_loaded_model(run_dir, info.device)
        except EveryCheckpointDamaged as exc:
            raise EvalError(
                f"every checkpoint in {exc.directory} is damaged ({', '.join(exc.damaged)}; the warnings above say "
                "how); nothing to evaluate: restore one, or retrain"
            ) from None
        tokenizer = run_tokenizer(run_dir)
        if data:
            dataset, indices = _data_dataset(cfg, data, tokenizer)
        else:
            dataset, indices = validation_set(build_dataset(cfg), cfg)
        n = len(indices) if not cfg.train.eval_batches or data else None
        n_samples = check_eval_size(cfg, len(indices), info.world_size) if n is None else n
        if n_samples < 1:
            raise EvalError("the data to evaluate holds no sample; give more data or a shorter data.seq_len")
        byte_lengths = byte_lengths_for(cfg, tokenizer, info.device)
        figures = run_evaluation(model, cfg, info, precision, dataset, indices, n_samples, byte_lengths)
        return {"step": step, "samples": n_samples, "tokens": n_samples * cfg.data.seq_len,
                "data": data or "validation split", **figures}  # fmt: skip
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="the run to evaluate")
    parser.add_argument("--data", default="", help="evaluate on the whole of this token file or text glob")
    parser.add_argument("--gpus", type=count_arg("--gpus"), help="processes (default: the checkpoint's world size)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.run_dir:
        raise EvalError("RUN_DIR is required: make eval RUN_DIR=runs/<run>")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"RUN_DIR={run_dir} is not a directory; give a make train RUN_DIR")
    if args.worker:
        _worker_main(run_dir, args.data)
    if is_weights_directory(run_dir):
        weights_config(run_dir, args.data)  # DATA and the model checked before any process starts
        saved = 1  # one process unless GPUS says more
    else:
        saved = newest_checkpoint_layout(run_dir)["world_size"]  # as many as the checkpoint was saved by
        run_config(run_dir)
    nproc = check_workers(args.gpus, _visible_gpus(), "--gpus") if args.gpus is not None else saved
    forwarded = ["--worker", "--run-dir", str(run_dir), *(["--data", args.data] if args.data else [])]
    return launch("train.eval", forwarded, nproc)


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worker_main(run_dir: Path, data: str) -> None:
    """Evaluate, print (rank 0), and leave without interpreter teardown, as train.worker does (gloo on torch 2.4)."""
    rank = int(os.environ.get("RANK", 0))
    code = 0
    try:
        figures = worker(run_dir, data)
        if rank == 0:
            write_text_atomically(run_dir / EVAL_RECORD, json.dumps(figures, indent=1) + "\n")
            shown = " | ".join(f"{k} {v:.4f}" for k, v in figures.items() if k.startswith("val_"))
            print(f"torchrig eval: step {figures['step']}: {shown} ({figures['samples']:,} samples of "
                  f"{figures['data']}); written to {run_dir / EVAL_RECORD}")  # fmt: skip
    except UserError as exc:
        if rank == 0:
            print(f"torchrig eval: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_cli("eval", main)
