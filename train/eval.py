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

    python -m train.eval --run-dir RUN_DIR [--data PATH] [--gpus N] [--micro-batch M]
        (make eval RUN_DIR=… [DATA=…] [GPUS=…] [MICRO_BATCH=…])

evaluates the newest valid checkpoint of RUN_DIR (DDP or FSDP) on the run's validation split, or
on the whole of PATH (a token file, or text, tokenized with the run's tokenizer), and writes
RUN_DIR/eval.json. make eval is a reader: the config comes with the checkpoint's weights (not the
first launch's manifest), any number of processes reads it whatever world size saved it, MICRO_BATCH
sets only the forward's size, and the split's figure is training's (the same samples: eval_batches x
the world size and micro-batch the checkpoint trained with), whatever GPUS and MICRO_BATCH are.
Nothing is written into the run but eval.json, and a run directory it cannot write still gets its
figures printed; a second evaluation keeps the first as eval-<time>.json (write_record). DATA of
another tokenizer than the run's is refused (train/tokenizer.py TokenizerId), and so is text when the
run's tokenizer is missing: never silently bytes. Its workers end with their launcher (env/rig/lifeline.py).
RUN_DIR may also be a directory of weights alone (make export's, or a Hugging Face
checkpoint): it holds no validation split, so DATA is needed; samples are data.seq_len tokens as the
exported run trained them (its torchrig.json), else min(the model's max_seq_len, EXPORT_SEQ_LEN), and chat
data's the windows it was packed into (within max_seq_len); one per forward; one process unless GPUS says more.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shlex
import shutil
import sys
import time
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
from env.common.outputs import OutputBusy, OutputLock, remove_leftovers
from env.rig.launch import launch
from env.rig.lifeline import end_with_parent
from train.checkpoint import Checkpointer
from train.config import RunConfig
from train.config_loader import config_from_dict, default_config
from train.data import build_dataset, data_tokenizer, validation_set
from train.data.sources import TokenWindows, data_tokenizer_id, packed_seq_len, token_mask
from train.data.text import document_chunks, expand_globs, read_document
from train.data.tokens import BYTE_VOCAB, read_sidecar, read_token_file, sidecar_path
from train.distributed import DistInfo, all_reduce_sum, backstop_timeout, connect_store, init_distributed, shutdown
from train.errors import ConfigError, DataError
from train.models import get_spec
from train.models.loss import IGNORE_INDEX
from train.prepare import encode_files, never_wider
from train.run import Precision, Run, device_settings
from train.tokenizer import (
    RUN_TOKENIZER_NAME,
    UNKNOWN,
    TokenizerId,
    load_tokenizer,
    parse_tokenizer,
    read_tokenizer_bytes,
    recorded_tokenizer,
    token_byte_lengths,
    tokenizer_id,
)
from train.weights import (
    DamagedCheckpoints,
    build_loaded_model,
    is_weights_directory,
    model_config,
    model_tokenizer,
    saved_config,
)

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


def record_tokenizer(cfg: RunConfig, run_dir: Path, is_main: bool, resumed: bool = False) -> Path | None:
    """Copy the data's tokenizer to RUN_DIR/tokenizer.json (where sample and eval look); its path, or None for bytes.

    A resumed run whose weights were trained on another tokenizer's ids than data.path holds is refused:
    the same ids would be other text. The copy is of a regular file, never a symlink, parsed first.
    """
    source = data_tokenizer(cfg)
    target = run_dir / RUN_TOKENIZER_NAME
    mine = tokenizer_id(source)
    recorded = tokenizer_id(target) if os.path.lexists(target) else UNKNOWN  # a byte run keeps none
    if resumed and recorded.conflicts(mine):
        raise DataError(
            f"{run_dir}'s checkpoints were trained on ids of {recorded.describe()}, but data.path={cfg.data.path!r} "
            f"holds ids of {mine.describe()}: resume on data of the run's tokenizer, or train in a new RUN_DIR"
        )
    if source is None:
        return None
    if is_main and recorded != mine:  # a fresh run, or its first launch with a tokenizer
        content = read_tokenizer_bytes(source, "copy the tokenizer file itself beside the token file", follow=False)
        parse_tokenizer(content, source)
        write_text_atomically(target, content.decode("utf-8"))
        never_wider(target, source)
    return target


class Evaluator:
    """The loop's validation: `after_step` evaluates on eval steps and returns the figures to log."""

    def __init__(self, run: Run, run_dir: Path, dataset: Dataset) -> None:
        cfg, info = run.cfg, run.info
        self.run = run
        # data.val_fraction=0 without data.val_path holds nothing out: there is nothing to evaluate on.
        self.every = cfg.train.eval_every if cfg.data.val_fraction or cfg.data.val_path else 0
        tokenizer = record_tokenizer(cfg, run_dir, info.is_main, resumed=run.start_step > 0)
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


def saved_run_config(config: dict[str, Any], run_dir: Path) -> RunConfig:
    """The RunConfig a checkpoint was saved with (its header's config, the world size set aside)."""
    try:
        return config_from_dict({k: v for k, v in config.items() if k != "world_size"})
    except ConfigError as exc:
        raise EvalError(
            f"the newest checkpoint of {run_dir} holds a config this torchrig cannot read ({exc})"
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
    packed = _packed_seq_len(data)
    if packed:  # chat data is read in the windows it was packed into: weights alone have no seq_len to set
        ceiling = getattr(model, limit) if limit else None
        if ceiling is not None and packed > ceiling:
            raise EvalError(
                f"DATA={data} packs its conversations into windows of {packed} tokens, more than the {ceiling} "
                f"positions the weights in {run_dir} take; prepare it again with SEQ_LEN={ceiling} or less"
            )
        cfg.data.seq_len = packed
    cfg.data.source, cfg.data.path, cfg.train.micro_batch = "files", data, 1
    return cfg


def _packed_seq_len(data: str) -> int | None:
    """The window length chat data DATA was packed into (None: DATA is no chat token set)."""
    if not data.endswith(".bin"):
        return None
    try:
        meta = read_sidecar(sidecar_path(Path(data)))
    except DataError:
        return None  # reading DATA itself names the problem
    return packed_seq_len(data, meta)


def weights_only(run_dir: Path) -> bool:
    """Whether RUN_DIR is a directory of weights alone (an export or an HF checkpoint), not a training run."""
    try:
        return is_weights_directory(run_dir)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None


def eval_samples(cfg: RunConfig, available: int, trained_world: int, whole: bool) -> int:
    """How many samples make eval reads: all of DATA, or of the split what training's evaluation read
    (train.eval_batches x the world size and micro-batch the checkpoint was trained with; 0: all), so
    that the figure is the one training logged whatever GPUS and MICRO_BATCH make eval runs with."""
    if whole or not cfg.train.eval_batches:
        return available
    return min(available, cfg.train.eval_batches * trained_world * cfg.train.micro_batch)


def _data_dataset(
    cfg: RunConfig, data: str, made_by: TokenizerId, tokenizer: Path | None
) -> tuple[Dataset, np.ndarray]:
    """The whole of DATA as token windows: a token file as it is, text through the run's tokenizer (or as bytes).

    Ids mean text only under the tokenizer that made them: DATA made by another than the run's is refused.
    """
    if get_spec(cfg.model.arch).inputs != "tokens":
        raise EvalError(
            f"DATA={data}: a {cfg.model.arch} run classifies images; make eval evaluates it on its validation "
            "split: drop DATA"
        )
    mask = None
    if data.endswith(".bin"):
        tokens, meta = read_token_file(data, "DATA")
        mask = token_mask(data, meta, cfg.data.seq_len, "the run's data.seq_len")
        data_made_by = recorded_tokenizer(meta)
        if data_made_by.conflicts(made_by) or (made_by.kind == "tokenizer" and data_made_by.kind == "unknown"):
            raise EvalError(
                f"DATA={data} holds ids of {data_made_by.describe()}, but the run reads ids of {made_by.describe()}; "
                f"prepare DATA with the run's tokenizer (make prepare TOKENIZER=<RUN_DIR>/{RUN_TOKENIZER_NAME})"
            )
    else:
        files = expand_globs([data], "DATA", "check the path and quote globs")
        if made_by.kind == "bytes" or (made_by.kind == "any" and cfg.model.vocab_size <= BYTE_VOCAB):
            tokens = np.concatenate(list(document_chunks(files)))
        elif tokenizer is not None:
            tokens = np.concatenate(list(encode_files(_text_files(files, data), load_tokenizer(tokenizer))))
        else:
            raise EvalError(
                f"DATA={data} is text, and the run reads ids of {made_by.describe()}, but RUN_DIR has no "
                f"{RUN_TOKENIZER_NAME} to make them: copy the run's tokenizer there, or give DATA as a token file "
                "made with it"
            )
    if len(tokens) and int(tokens.max()) >= cfg.model.vocab_size:
        raise EvalError(
            f"DATA={data} holds token id {int(tokens.max())}, beyond the model's vocab_size={cfg.model.vocab_size}"
        )
    if len(tokens) < cfg.data.seq_len + 1:
        raise EvalError(
            f"DATA={data} holds {len(tokens):,} tokens, fewer than one sample of {cfg.data.seq_len + 1} (the run's "
            "data.seq_len + 1); give more data"
        )
    dataset = TokenWindows(tokens, cfg.data.seq_len, "files", data, mask)
    return dataset, np.arange(len(dataset), dtype=np.int64)


def _text_files(files: list[Path], data: str) -> list[Path]:
    """DATA's files, each checked to be readable UTF-8 text (a tokenizer reads text), in make eval's words."""
    for path in files:
        try:
            read_document(path).decode("utf-8")
        except DataError as exc:
            raise EvalError(f"DATA={data}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise EvalError(
                f"DATA={data}: {path} is not UTF-8 text (byte {exc.start}), which the run's tokenizer reads; "
                "leave it out of DATA"
            ) from None
    return files


def worker(run_dir: Path, data: str, micro_batch: int | None) -> dict[str, Any]:
    """One eval process (torchrun started it): the newest valid checkpoint's weights, evaluated; the figures.

    A reader: it builds the model and its weights alone (train.weights, any strategy and world size the
    checkpoint was saved with), never the training state, and writes nothing into checkpoints/.
    """
    defaults = default_config()  # the process group's timeouts; the run's own config comes with its weights
    store = connect_store(backstop_timeout(defaults))
    info = init_distributed(defaults, run_dir, store)
    try:
        try:
            model, config, step = build_loaded_model(run_dir, info.device, samples=micro_batch, seq_len=None)
        except DamagedCheckpoints as exc:
            raise EvalError(
                f"every checkpoint in {exc.directory} is damaged ({', '.join(exc.damaged)}; the warnings above say "
                "how); nothing to evaluate: restore them from a copy"
            ) from None
        cfg = weights_config(run_dir, data) if weights_only(run_dir) else saved_run_config(config, run_dir)
        device_settings(cfg, info.device)
        precision = Precision.resolve(cfg.train.precision, info.device)
        made_by, tokenizer = model_tokenizer(run_dir, config)
        if data:
            dataset, indices = _data_dataset(cfg, data, made_by, tokenizer)
        else:
            if data_tokenizer_id(cfg).conflicts(made_by):
                raise EvalError(
                    f"the run's data ({cfg.data.path}) now holds ids of {data_tokenizer_id(cfg).describe()}, but "
                    f"its weights read ids of {made_by.describe()}; give DATA made with the run's tokenizer"
                )
            dataset, indices = validation_set(build_dataset(cfg), cfg)
        trained_world = config.get("world_size") if isinstance(config.get("world_size"), int) else 1
        n_samples = eval_samples(cfg, len(indices), trained_world, bool(data))
        if n_samples < 1:
            raise EvalError(
                "the validation split holds no sample (data.val_fraction=0 and no data.val_path); "
                "give DATA=<token file or text> to evaluate on"
            )
        figures = evaluate(
            model, dataset, indices, n_samples=n_samples, rank=info.rank, world_size=info.world_size,
            micro_batch=micro_batch or cfg.train.micro_batch, device=info.device,
            autocast=lambda: precision.autocast(info.device), all_reduce=all_reduce_sum,
            byte_lengths=byte_lengths_for(cfg, tokenizer, info.device),
        )  # fmt: skip
        return {"step": step, "samples": n_samples, "tokens": n_samples * cfg.data.seq_len,
                "data": data or "validation split", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **figures}  # fmt: skip
    finally:
        shutdown()


def write_record(run_dir: Path, figures: dict[str, Any]) -> str:
    """Write eval.json (the newest evaluation, what scripts read), keeping the one before as eval-<time>.json.

    Kept, not overwritten: an evaluation of other DATA or of an earlier checkpoint is another figure, and a
    second make eval must not lose the first silently. Returns the words that say where it went.
    """
    target = run_dir / EVAL_RECORD
    try:
        with OutputLock(target, "eval.json"):
            remove_leftovers(run_dir, [EVAL_RECORD])
            kept = _keep_previous(target)
            write_text_atomically(target, json.dumps(figures, indent=1) + "\n")
    except OutputBusy as exc:
        return f"not written: {exc}"
    except OSError as exc:  # a read-only or full RUN_DIR: the figures above are the result
        return f"not written to {target} ({exc.strerror}): the figures are above"
    return f"written to {target}" + (f"; the previous one kept as {kept.name}" if kept else "")


def _keep_previous(target: Path) -> Path | None:
    """The existing eval.json linked (else copied) to eval-<its time>.json, under a name not yet taken."""
    if not os.path.lexists(target):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(os.lstat(target).st_mtime))
    for attempt in range(1000):
        kept = target.with_name(f"eval-{stamp}{f'-{attempt}' if attempt else ''}.json")
        try:
            os.link(target, kept, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links
            if os.path.lexists(kept):
                continue
            shutil.copyfile(target, kept, follow_symlinks=False)
        return kept
    raise FileExistsError(errno.EEXIST, "no free name for the previous record", str(target))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="the run to evaluate")
    parser.add_argument("--data", default="", help="evaluate on the whole of this token file or text glob")
    parser.add_argument("--gpus", type=count_arg("--gpus"), help="processes (default: every GPU, or 1 CPU process)")
    parser.add_argument(
        "--micro-batch", type=count_arg("--micro-batch"), help="samples per process and forward (default: the run's)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.run_dir:
        raise EvalError("RUN_DIR is required: make eval RUN_DIR=runs/<run>")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"RUN_DIR={run_dir} is not a directory; give a make train RUN_DIR")
    if args.micro_batch == 0:
        raise EvalError("MICRO_BATCH=0: give at least 1 sample per forward, e.g. MICRO_BATCH=8")
    if args.worker:
        _worker_main(run_dir, args.data, args.micro_batch)
    if not os.access(run_dir, os.R_OK | os.X_OK):
        raise EvalError(f"RUN_DIR={run_dir} cannot be read by this user; give a run directory you can read")
    if weights_only(run_dir):
        weights_config(run_dir, args.data)  # DATA and the model checked before any process starts
        nproc = check_workers(args.gpus, _visible_gpus(), "--gpus") if args.gpus is not None else 1
    # Whether any was written; which one is usable (or damaged) the workers say, after their checks.
    elif not Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).listed_steps():
        train = f"make train RUN_DIR={shlex.quote(str(run_dir))}"
        raise EvalError(f"{run_dir} has no checkpoint to evaluate; train first ({train})")
    else:
        # Any number of processes: each reads the whole model, whatever world size saved it (train.weights).
        nproc = check_workers(args.gpus, _visible_gpus(), "--gpus")
    forwarded = ["--worker", "--run-dir", str(run_dir), *(["--data", args.data] if args.data else []),
                 *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])]  # fmt: skip
    return launch("train.eval", forwarded, nproc)


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worker_main(run_dir: Path, data: str, micro_batch: int | None) -> None:
    """Evaluate, print (rank 0), and leave without interpreter teardown, as train.worker does (gloo on torch 2.4)."""
    end_with_parent()  # a killed make eval takes its workers along: none goes on to write eval.json
    rank = int(os.environ.get("RANK", 0))
    code = 0
    try:
        figures = worker(run_dir, data, micro_batch)
        if rank == 0:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in figures.items() if k.startswith("val_"))
            where = write_record(run_dir, figures)
            print(f"torchrig eval: step {figures['step']}: {shown} ({figures['samples']:,} samples of "
                  f"{figures['data']}); {where}")  # fmt: skip
    except UserError as exc:
        if rank == 0:
            print(f"torchrig eval: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_cli("eval", main)
