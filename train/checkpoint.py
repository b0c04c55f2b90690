"""Checkpoints: atomic, verified, data-only, and resumable bit for bit.

Layout under RUN_DIR/checkpoints/ (one entry per saved step):

    step-000100.pt     DDP: one file, written by rank 0 (model, optimizer, RNG of every rank, extra)
    step-000100/       FSDP: a torch.distributed.checkpoint directory (tensor shards of every rank)
                       plus extra.pt (RNG of every rank, extra, the non-tensor optimizer state)
    step-000100.json   the sidecar: sha256 and size of every file; written LAST

A checkpoint is complete exactly when its sidecar exists, so a save cut short at any point
leaves the previous checkpoints as they were. Payloads are written under a temporary name,
fsynced, renamed, and the directory fsynced; old checkpoints are pruned only afterwards.

A checkpoint is data, never code: files load with torch.load(weights_only=True), and the
pickled DCP metadata is first replayed through an allow-list (DCP itself unpickles it freely).
The FSDP shards hold only tensors, which DCP reads with weights_only=True; every non-tensor
value travels in extra.pt instead.

Every method but latest_step is collective when torch.distributed is initialized: every
rank calls it, and a failure on any rank becomes the same one-line CheckpointError on all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from env.atomic import DEFAULT_WRITE_FIX, write_fix
from train.config import flatten

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_KEY = "config"  # where the trainer puts RunConfig.to_dict() inside `extra`
STEP_PATTERN = re.compile(r"^step-(\d+)(\.pt|\.json)?$")
TEMP_PREFIX = ".tmp-"
FSDP_EXTRA_FILE = "extra.pt"
PREFLIGHT_MARGIN_BYTES = 64 * 2**20
HASH_CHUNK_BYTES = 8 * 2**20

# Config keys whose change breaks an exact resume: the model's shape, the sample stream,
# the global batch and how state is laid out. Everything else (budget, logging, timeouts,
# lr schedule, workers) may change between runs of one RUN_DIR.
RESUME_FIXED_PREFIXES = ("model.",)
RESUME_FIXED_KEYS = (
    "data.source",
    "data.path",
    "data.seq_len",
    "train.micro_batch",
    "train.accum",
    "train.seed",
    "train.strategy",
    "world_size",
)

# Types torch.load(weights_only=True) rebuilds on torch 2.4 and later; `extra` must hold only these.
PLAIN_LEAF_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
PLAIN_CONTAINER_TYPES = (dict, OrderedDict, list, tuple, torch.Size)

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used; the message is one line with the fix."""


# ---------------------------------------------------------------------------------------------
# Random number generators


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


# ---------------------------------------------------------------------------------------------
# Collectives: every rank takes part, or nothing happens


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (works on gloo and NCCL; NCCL needs torch.cuda.set_device first)."""
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _from_rank0(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _failures() -> tuple[type[BaseException], ...]:
    """What a checkpoint step can raise: DCP's CheckpointException derives from BaseException, not Exception.

    Imported late: torch.distributed.checkpoint takes seconds to import and only FSDP needs it.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _first_problem(problem: str | None) -> str | None:
    """Agree across ranks: the first rank's problem, or None when every rank is fine."""
    return next((p for p in _all_gather(problem) if p), None)


# ---------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


class _HashingWriter:
    """A file wrapper that hashes what passes through, so a checkpoint is never read back to hash it."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _hash_file(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(digest.hexdigest(), size)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_hashed(obj: Any, path: Path) -> FileRecord:
    """torch.save into `path`, durably, hashing on the way."""
    with path.open("wb") as f:
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(hashing.digest.hexdigest(), hashing.size)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, also when DCP wrapped per-rank failures in a CheckpointException."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if isinstance(current, tuple):  # DCP keeps (exception, traceback) pairs
            pending.extend(current)
            continue
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        pending.extend([current.__cause__, current.__context__, *getattr(current, "failures", {}).values()])
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values torch.load(weights_only=True) would not rebuild, naming where they sit."""
    if type(obj) in (torch.Tensor, nn.Parameter) or type(obj) in PLAIN_LEAF_TYPES:
        return
    if type(obj) in PLAIN_CONTAINER_TYPES:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise CheckpointError(f"{where} is a {kind}, which a weights-only checkpoint cannot hold; make it a list or tensor")


# ---------------------------------------------------------------------------------------------
# Models


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers, whose state_dict keys carry no prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _split_tensors(tree: dict[Any, Any]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Split a nested dict into its tensor leaves and everything else (same nesting in both)."""
    tensors: dict[Any, Any] = {}
    rest: dict[Any, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub_tensors, sub_rest = _split_tensors(value)
            if sub_tensors:
                tensors[key] = sub_tensors
            if sub_rest or not sub_tensors:
                rest[key] = sub_rest
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: dict[Any, Any], rest: dict[Any, Any]) -> dict[Any, Any]:
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


# ---------------------------------------------------------------------------------------------
# Config compatibility


def _fixed_for_resume(key: str) -> bool:
    return key.startswith(RESUME_FIXED_PREFIXES) or key in RESUME_FIXED_KEYS


def _mismatch(key: str, saved: Any, current: Any) -> CheckpointError:
    return CheckpointError(
        f"RUN_DIR holds a checkpoint with {key}={saved!r} but this run has {key}={current!r}; "
        "use a new RUN_DIR or restore the config"
    )


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise naming the first key whose change breaks resuming `saved` under `current`.

    Both are RunConfig.to_dict() output, optionally with a top-level "world_size". A key
    that only one side has (a config field added or removed since) is not compared.
    """
    saved_flat, current_flat = flatten(saved), flatten(current)
    for key, value in current_flat.items():
        if _fixed_for_resume(key) and key in saved_flat and saved_flat[key] != value:
            raise _mismatch(key, saved_flat[key], value)


# ---------------------------------------------------------------------------------------------
# DCP metadata: replayed through an allow-list before DCP unpickles it


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata only from DCP's own dataclasses and enums and a few torch values."""

    EXTRA_ALLOWED = frozenset(
        {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "Path"),
        }
    )

    TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member  # Python 3.11.0-3.11.4 pickle Enum members as getattr(cls, name)
        if (module, name) in self.EXTRA_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), self.TORCH_VALUE_TYPES):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise pickle.UnpicklingError(f"it would import {module}.{name}")


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """getattr limited to a member of an Enum class the unpickler already allowed."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str):
        try:
            return cls[name]
        except KeyError:
            pass
    raise pickle.UnpicklingError(f"it would look up {name!r} on {cls!r}")


def _check_dcp_metadata(path: Path) -> None:
    """Raise pickle.UnpicklingError unless `path` is DCP metadata naming tensors only.

    Tensors only, because DCP reads any entry its metadata calls bytes with a full unpickle.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with path.open("rb") as f:
        metadata = _MetadataUnpickler(f).load()
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
        raise pickle.UnpicklingError("its metadata lists entries other than tensors")


def _load_plain(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_problem(name: str, exc: Exception) -> str:
    """One line for a checkpoint file that failed to load after its checksum passed."""
    if isinstance(exc, pickle.UnpicklingError):
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = f"it would import {named.group(1)}" if named else str(exc).strip().splitlines()[0]
        return f"checkpoint {name} is not plain data ({why}); refused and skipped"
    return f"checkpoint {name} cannot be read ({_first_line(exc)}); skipped"


# ---------------------------------------------------------------------------------------------
# The two on-disk formats, one per strategy


class _SingleFileFormat:
    """DDP: replicas are identical, so rank 0 writes the unwrapped model and the optimizer in one file."""

    def entry_name(self, step: int) -> str:
        return f"step-{step:06d}.pt"

    def write(
        self, ckpt: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, header: dict[str, Any]
    ) -> dict[str, FileRecord]:
        def write_on_rank0() -> dict[str, FileRecord]:
            if ckpt.rank != 0:
                return {}
            name = self.entry_name(step)
            temp = ckpt.directory / f"{TEMP_PREFIX}{name}"
            payload = {**header, "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
            _check_plain(payload, "checkpoint")
            record = _save_hashed(payload, temp)
            ckpt.replace_entry(temp, name)
            return {name: record}

        return ckpt.collectively(step, write_on_rank0)

    def read(self, ckpt: Checkpointer, step: int) -> dict[str, Any]:
        return _load_plain(ckpt.directory / self.entry_name(step))

    def apply(
        self, ckpt: Checkpointer, payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        unwrap_model(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Hide DCP's notes that ask nothing of the user: torch 2.4 tripping its own TypedStorage
    deprecation, and the reminder that one process without a process group saves alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield


class _ShardedFormat:
    """FSDP: every rank writes its shards through torch.distributed.checkpoint; rank 0 adds extra.pt."""

    def entry_name(self, step: int) -> str:
        return f"step-{step:06d}"

    def write(
        self, ckpt: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, header: dict[str, Any]
    ) -> dict[str, FileRecord]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = self.entry_name(step)
        temp = ckpt.directory / f"{TEMP_PREFIX}{name}"

        def make_empty_temp() -> None:
            if ckpt.rank == 0:
                _remove(temp)
                temp.mkdir()

        def write_shards() -> dict[Any, Any]:
            model_state, optim_state = get_state_dict(unwrap_model(model), optimizer)
            tensors, rest = _split_tensors({"model": model_state, "optim": optim_state})
            with _quiet_dcp():
                dcp.save(tensors, checkpoint_id=temp)
            return rest

        ckpt.collectively(step, make_empty_temp)
        rest = ckpt.collectively(step, write_shards)

        def write_extra_on_rank0() -> list[str]:
            if ckpt.rank != 0:
                return []
            extra = {**header, "state_rest": rest}
            _check_plain(extra, "checkpoint")
            _save_hashed(extra, temp / FSDP_EXTRA_FILE)
            return sorted(p.name for p in temp.iterdir())

        files = _from_rank0(ckpt.collectively(step, write_extra_on_rank0))
        records = ckpt.hash_collectively(step, temp, files)

        def commit_on_rank0() -> dict[str, FileRecord]:
            if ckpt.rank != 0:
                return {}
            _fsync_dir(temp)
            ckpt.replace_entry(temp, name)
            return {f"{name}/{file}": record for file, record in records.items()}

        return ckpt.collectively(step, commit_on_rank0)

    def read(self, ckpt: Checkpointer, step: int) -> dict[str, Any]:
        entry = ckpt.directory / self.entry_name(step)
        _check_dcp_metadata(entry / ".metadata")
        return _load_plain(entry / FSDP_EXTRA_FILE)

    def apply(
        self, ckpt: Checkpointer, payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        module = unwrap_model(model)
        # The current state gives DCP the sharded tensors to read into, in place.
        model_state, optim_state = get_state_dict(module, optimizer)
        tensors, _ = _split_tensors({"model": model_state, "optim": optim_state})
        with _quiet_dcp():
            dcp.load(tensors, checkpoint_id=ckpt.directory / self.entry_name(payload["step"]))
        state = _merge(tensors, payload["state_rest"])
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


FORMATS = {"ddp": _SingleFileFormat, "fsdp": _ShardedFormat}


# ---------------------------------------------------------------------------------------------
# The checkpointer


class Checkpointer:
    """Saves and restores training state under run_dir/checkpoints, keeping the newest `keep`."""

    def __init__(self, run_dir: Path, *, keep: int, rank: int, world_size: int, strategy: str) -> None:
        if strategy not in FORMATS:
            raise CheckpointError(f"checkpoint strategy {strategy!r} is not one of {', '.join(FORMATS)}")
        if keep < 1:
            raise CheckpointError(f"keep={keep} must be at least 1; set train.keep_ckpts")
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.strategy = strategy
        self.format = FORMATS[strategy]()

    # -- before training

    def preflight(self, estimate_bytes: int) -> None:
        """Fail before training if checkpoints could not be written: the directory, then the free space.

        `estimate_bytes` is one checkpoint's size, all ranks together (FSDP: the sum of the shards).
        Rank 0 checks, for all ranks: with FSDP every shard lands in the same directory.
        """
        problem = self._preflight_problem(estimate_bytes) if self.rank == 0 else None
        problem = _first_problem(problem)
        if problem:
            raise CheckpointError(problem)

    def _preflight_problem(self, total_bytes: int) -> str | None:
        fix = "fix its permissions or set RUN_DIR elsewhere"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create checkpoint directory {self.directory} ({exc.strerror}); {fix}"
        if not os.access(self.directory, os.W_OK | os.X_OK):
            return f"checkpoint directory {self.directory} is not writable; {fix}"
        probe = self.directory / f"{TEMP_PREFIX}preflight-{os.getpid()}"
        try:
            probe.write_bytes(b"probe")
            probe.unlink()
        except OSError as exc:
            return f"cannot write in checkpoint directory {self.directory} ({exc.strerror}); {fix}"
        needed = 2 * total_bytes + PREFLIGHT_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            return (
                f"{self.directory} has {free / 2**30:.2f} GiB free but checkpoints need about {needed / 2**30:.2f} GiB "
                "(the new one is written before the old one is removed); free space or set RUN_DIR elsewhere"
            )
        return None

    # -- saving

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Write a checkpoint for `step`; every rank calls this. Returns the checkpoint's path."""
        rng = _all_gather(capture_rng())
        header = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "rng": rng,
            "extra": extra,
        }
        try:
            self.collectively(step, lambda: self._prepare(header) if self.rank == 0 else None)
            records = self.format.write(self, step, model, optimizer, header)
            self.collectively(step, lambda: self._commit(step, records) if self.rank == 0 else None)
        except CheckpointError:
            if self.rank == 0:
                self._discard_uncommitted(step)
            raise
        if self.rank == 0:
            self._prune(step)
        return self.directory / self.format.entry_name(step)

    def _prepare(self, header: dict[str, Any]) -> None:
        _check_plain(header, "checkpoint")  # before anything is written; the formats check the rest
        self.directory.mkdir(parents=True, exist_ok=True)

    def collectively(self, step: int, action: Callable[[], T]) -> T:
        """Run one phase of a save on every rank; a failure anywhere raises the same line everywhere."""
        result: Any = None
        problem, error = None, None
        try:
            result = action()
        except _failures() as exc:
            problem, error = self._save_failure(step, exc), exc
        agreed = _first_problem(problem)
        if agreed:
            raise CheckpointError(agreed) from error
        return result

    def hash_collectively(self, step: int, base: Path, names: list[str]) -> dict[str, FileRecord]:
        """sha256 of `names` under `base`, each rank hashing its share; the merged records on every rank."""
        share = names[self.rank :: self.world_size]
        mine = self.collectively(step, lambda: {name: _hash_file(base / name) for name in share})
        merged: dict[str, FileRecord] = {}
        for part in _all_gather(mine):
            merged.update(part)
        return merged

    def replace_entry(self, temp: Path, name: str) -> None:
        """Move a finished payload into place; a same-step checkpoint is uncommitted first, then replaced."""
        target = self.directory / name
        self._sidecar(self._step_of(name)).unlink(missing_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(temp, target)
        _fsync_dir(self.directory)

    def _commit(self, step: int, records: dict[str, FileRecord]) -> None:
        """Write the sidecar, which makes the checkpoint complete."""
        sidecar = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "torch": torch.__version__,
            "files": {name: dataclasses.asdict(record) for name, record in records.items()},
        }
        temp = self.directory / f"{TEMP_PREFIX}{self._sidecar(step).name}"
        with temp.open("w") as f:
            json.dump(sidecar, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self._sidecar(step))
        _fsync_dir(self.directory)

    def _save_failure(self, step: int, exc: BaseException) -> str:
        if isinstance(exc, CheckpointError):
            return str(exc)
        os_error = _os_error(exc)
        if os_error is not None:
            reason = os_error.strerror or _first_line(os_error)
            fix = write_fix(os_error)
        else:
            reason, fix = _first_line(exc), DEFAULT_WRITE_FIX
        previous = max((s for s in self._committed_steps() if s != step), default=None)
        kept = (
            f"the previous checkpoint step {previous} is intact" if previous is not None else "none was written before"
        )
        return f"checkpoint for step {step} could not be written ({reason}); {kept}: {fix}"

    def _discard_uncommitted(self, step: int) -> None:
        """After a failed save: remove its temporary files, and its payload if it never got a sidecar."""
        for path in self._temporaries():
            _remove(path)
        if not self._sidecar(step).exists():
            _remove(self.directory / self.format.entry_name(step))

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step`; newer ones are an abandoned run's and left alone.

        Sidecars go first, so a checkpoint half-deleted by a crash reads as incomplete, not corrupt.
        """
        committed = [s for s in self._committed_steps() if s <= step]
        doomed = set(committed[: -self.keep]) | {s for s in self._entry_steps() if s < step and s not in committed}
        for old in sorted(doomed):
            try:
                self._sidecar(old).unlink(missing_ok=True)
                _remove(self.directory / self.format.entry_name(old))
            except OSError as exc:
                log.warning(f"could not remove old checkpoint step {old} ({exc.strerror}); remove it by hand")
        for path in self._temporaries():
            _remove(path)

    # -- loading

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, config: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Restore the newest valid checkpoint into `model` and `optimizer`, and this rank's RNG.

        Returns the saved `extra` with "step", or None when there is no usable checkpoint.
        Call before the first optimizer step, with gradients unset. With `config` (this run's
        RunConfig.to_dict()), a changed key that breaks resuming is refused before any state moves.
        """
        for step in _from_rank0(self._candidate_steps() if self.rank == 0 else []):
            payload = self._verified_payload(step)
            if payload is None:
                continue
            saved_config = payload["extra"].get(CONFIG_KEY)
            if config is not None and isinstance(saved_config, dict):
                check_compatible(saved_config, config)
            try:
                self.format.apply(self, payload, model, optimizer)
            except _failures() as exc:
                raise CheckpointError(
                    f"checkpoint step {step} does not fit this model and optimizer ({_first_line(exc)}); "
                    "use a new RUN_DIR or restore the config"
                ) from exc
            restore_rng(payload["rng"][self.rank])
            return {**payload["extra"], "step": payload["step"]}
        return None

    def latest_step(self) -> int | None:
        """The newest complete step (sidecar present, sizes right), without hashing or loading; any rank."""
        for step in self._candidate_steps():
            sidecar = self._read_sidecar(step)
            if isinstance(sidecar, dict) and self._size_problem(sidecar["files"]) is None:
                return step
        return None

    def _verified_payload(self, step: int) -> dict[str, Any] | None:
        """The checkpoint's header payload on every rank, or None (logged once) when it is unusable."""
        sidecar = _from_rank0(self._read_sidecar(step) if self.rank == 0 else None)
        if isinstance(sidecar, str):
            return self._skip(sidecar)
        self._check_layout(sidecar)
        self._check_visible(step)
        names = sorted(sidecar["files"])
        problem = self._size_problem(sidecar["files"]) if self.rank == 0 else None
        if problem is None:
            problem = self._checksum_problem(names[self.rank :: self.world_size], sidecar["files"])
        problem = _first_problem(problem)
        if problem:
            return self._skip(problem)
        payload, problem = None, None
        try:
            payload = self.format.read(self, step)
        except Exception as exc:
            problem = _read_problem(self.format.entry_name(step), exc)
        problem = _first_problem(problem)
        if problem:
            return self._skip(problem)
        self._check_layout(payload)
        return payload

    def _skip(self, problem: str) -> None:
        if self.rank == 0:
            log.warning(f"{problem}; trying the one before")
        return None

    def _check_layout(self, saved: dict[str, Any]) -> None:
        """A checkpoint from another world size or strategy is a config change, not damage: refuse it."""
        for key, saved_value, current in (
            ("world_size", saved.get("world_size"), self.world_size),
            ("train.strategy", saved.get("strategy"), self.strategy),
        ):
            if saved_value is not None and saved_value != current:
                raise _mismatch(key, saved_value, current)

    def _check_visible(self, step: int) -> None:
        """Every rank reads the files rank 0 found; a rank that cannot see them means RUN_DIR is not shared."""
        entry = self.directory / self.format.entry_name(step)
        seen = _all_gather(entry.exists())
        if seen[0] and not all(seen):
            raise CheckpointError(
                f"rank {seen.index(False)} cannot see {entry}, which rank 0 can; "
                "put RUN_DIR on storage that every node shares"
            )

    def _read_sidecar(self, step: int) -> dict[str, Any] | str:
        """The sidecar, or a one-line reason the checkpoint is incomplete."""
        path = self._sidecar(step)
        try:
            sidecar = json.loads(path.read_text())
            files = {name: FileRecord(**record) for name, record in sidecar["files"].items()}
        except FileNotFoundError:
            return f"checkpoint {self.format.entry_name(step)} is incomplete (no {path.name}; the save was interrupted)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"checkpoint sidecar {path.name} is unreadable ({_first_line(exc)})"
        return {**sidecar, "files": files}

    def _size_problem(self, files: dict[str, FileRecord]) -> str | None:
        for name, record in files.items():
            try:
                size = (self.directory / name).stat().st_size
            except OSError as exc:
                return f"checkpoint file {name} is missing ({exc.strerror})"
            if size != record.size:
                return f"checkpoint file {name} is truncated or damaged ({size} bytes, expected {record.size})"
        return None

    def _checksum_problem(self, names: list[str], files: dict[str, FileRecord]) -> str | None:
        for name in names:
            try:
                actual = _hash_file(self.directory / name).sha256
            except OSError as exc:
                return f"checkpoint file {name} cannot be read ({exc.strerror})"
            if actual != files[name].sha256:
                return f"checkpoint file {name} is corrupt (sha256 differs from its sidecar)"
        return None

    # -- the directory

    def _sidecar(self, step: int) -> Path:
        return self.directory / f"step-{step:06d}.json"

    @staticmethod
    def _step_of(name: str) -> int:
        return int(STEP_PATTERN.match(name).group(1))

    def _entries(self) -> list[str]:
        try:
            return [p.name for p in self.directory.iterdir()]
        except OSError:
            return []

    def _entry_steps(self) -> set[int]:
        return {self._step_of(n) for n in self._entries() if STEP_PATTERN.match(n)}

    def _committed_steps(self) -> list[int]:
        return sorted(self._step_of(n) for n in self._entries() if STEP_PATTERN.match(n) and n.endswith(".json"))

    def _candidate_steps(self) -> list[int]:
        """Every step with a payload or a sidecar, newest first: incomplete ones are reported, then skipped."""
        return sorted(self._entry_steps(), reverse=True)

    def _temporaries(self) -> list[Path]:
        return [self.directory / n for n in self._entries() if n.startswith(TEMP_PREFIX)]
