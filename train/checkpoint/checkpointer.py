"""The checkpointer: saves and restores a dict of Stateful parts under RUN_DIR/checkpoints, keeping the newest few.

It knows nothing of what the parts hold (train/checkpoint/parts.py); adding a state is one more
entry in the dict. Each checkpoint is an entry folder (train/checkpoint/storage.py) and a sidecar
`step-000100.json` with the sha256 and size of every file, written last (records.py): a save cut
short at any point leaves the previous checkpoints as they were, and old ones are pruned only
after the new one is complete. On load, a damaged or hostile newest checkpoint is skipped for the
one before, with one warning line; when every committed checkpoint is damaged, the load is
refused rather than training from step 0 over the run's records.

Readers (eval, sample, export, train.init_from) read a run that may still be training and pruning:
a checkpoint whose sidecar disappears while it is read was pruned, not damaged. The reader then
lists the checkpoints again and reads the newest, up to READ_ROUNDS times; it never reports a
pruned checkpoint as damaged, nor a healthy run as one to retrain.

Every method but latest_step is collective when torch.distributed is initialized: every rank calls
it, and a failure on any rank becomes the same one-line CheckpointError on all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from env.common.atomic import DEFAULT_WRITE_FIX, TEMP_PREFIX, create_exclusive, write_fix
from train.checkpoint import storage
from train.checkpoint.errors import CheckpointError, EveryCheckpointDamaged
from train.checkpoint.parts import ModelState
from train.checkpoint.plain import check_plain, read_problem
from train.checkpoint.ranks import all_gather, collectively, failures, first_problem, from_rank0
from train.checkpoint.records import (
    FORMAT_VERSION,
    FileRecord,
    checksum_problem,
    first_line,
    hash_file,
    listing_problem,
    read_sidecar,
    remove,
    write_sidecar,
)
from train.checkpoint.resume import check_compatible, mismatch

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step-(\d+)(\.pt|\.json)?$")  # .pt: a DDP checkpoint of format 1
PREFLIGHT_MARGIN_BYTES = 64 * 2**20
# Times a reader lists the checkpoints again after the one it read was pruned meanwhile. A run
# saving every step with keep_ckpts=1 replaces its checkpoint once a step; a reader that loses this
# many rounds is slower than the run's steps, and says so instead of trying forever.
READ_ROUNDS = 5
T = TypeVar("T")


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


def _valid_header(header: Any, step: int) -> bool:
    return (
        isinstance(header, dict)
        and header.get("format") == FORMAT_VERSION
        and header.get("step") == step
        and isinstance(header.get("parts"), dict)
        and isinstance(header.get("tensors"), dict)
        and isinstance(header.get("part_names"), list)
        and isinstance(header.get("config"), dict | None)
    )


class _Pruned(Exception):
    """The checkpoint being read was pruned meanwhile (its sidecar is gone): list them again."""


@dataclasses.dataclass(frozen=True)
class Unusable:
    """Why a checkpoint cannot be loaded; `committed`: its sidecar exists, so it is damaged, not unfinished."""

    reason: str
    committed: bool


class Checkpointer:
    """Saves and restores `parts` under run_dir/checkpoints, keeping the newest `keep`.

    `config` (the run's RunConfig.to_dict() with "world_size") is recorded in every checkpoint,
    and a resume under a config that breaks it is refused before any state moves (resume.py).
    `strategy` None: a reader that takes a checkpoint of either strategy (see load_model).
    """

    def __init__(
        self,
        run_dir: Path,
        parts: dict[str, Stateful],
        *,
        keep: int,
        rank: int,
        world_size: int,
        strategy: str | None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if keep < 1:
            raise CheckpointError(f"keep={keep} must be at least 1; set train.keep_ckpts")
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "checkpoints"
        self.parts = parts
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.strategy = strategy
        self.config = config
        self.saved: list[int] = []  # steps this checkpointer committed, newest last (to tell a removed folder)

    # -- before training

    def preflight(self, estimate_bytes: int) -> None:
        """Fail before training if checkpoints could not be written: the directory, then the free space.

        `estimate_bytes` is one checkpoint's size, all ranks together. Rank 0 checks, for all ranks:
        every rank's files land in the same directory.
        """
        problem = self._preflight_problem(estimate_bytes) if self.rank == 0 else None
        problem = first_problem(problem)
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
        try:
            probe, handle = create_exclusive(self.directory, "preflight")
            with handle:
                handle.write(b"probe")
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

    def save(self, step: int) -> Path:
        """Write a checkpoint of every part for `step`; every rank calls this. Returns the entry's path."""
        tensors, rest = storage.split_tensors({name: part.state_dict() for name, part in self.parts.items()})
        header = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "config": self.config,
            "part_names": sorted(self.parts),
            "parts": rest,
            "tensors": storage.skeleton(tensors),
        }
        name = self._entry(step)
        rank0 = self.rank == 0
        try:
            temp = from_rank0(self._agree(step, lambda: self._prepare(header, name) if rank0 else None))
            self._agree(step, lambda: storage.write_tensors(temp, tensors))
            files = from_rank0(self._agree(step, lambda: storage.write_header(temp, header) if rank0 else None))
            records = self._hash_collectively(step, temp, files)
            self._agree(step, lambda: self._commit(step, temp, records) if rank0 else None)
        except CheckpointError:
            if rank0:
                self._discard_uncommitted(step)
            raise
        self.saved.append(step)
        if rank0:
            self._prune(step)
        return self.directory / name

    def _prepare(self, header: dict[str, Any], name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        check_plain(header, "checkpoint")  # before anything is written
        return storage.make_temp(self.directory, name)

    def _agree(self, step: int, action: Callable[[], T]) -> T:
        return collectively(action, lambda exc: self._save_failure(step, exc))

    def _hash_collectively(self, step: int, temp: Path, names: list[str]) -> dict[str, FileRecord]:
        """sha256 of `names` under `temp`, each rank hashing its share; the merged records on every rank."""
        share = names[self.rank :: self.world_size]
        mine = self._agree(step, lambda: {name: hash_file(temp / name) for name in share})
        merged: dict[str, FileRecord] = {}
        for part in all_gather(mine):
            merged.update(part)
        return merged

    def _commit(self, step: int, temp: Path, records: dict[str, FileRecord]) -> None:
        """Move the entry into place (a same-step checkpoint is uncommitted first), then write its sidecar."""
        name = self._entry(step)
        self._sidecar(step).unlink(missing_ok=True)
        storage.commit(self.directory, temp, name)
        fields = {"step": step, "world_size": self.world_size, "strategy": self.strategy, "torch": torch.__version__}
        write_sidecar(self._sidecar(step), fields, {f"{name}/{file}": record for file, record in records.items()})

    def _save_failure(self, step: int, exc: BaseException) -> str:
        os_error = _os_error(exc)
        if os_error is not None:
            reason = os_error.strerror or first_line(os_error)
            fix = write_fix(os_error)
        else:
            reason, fix = first_line(exc), DEFAULT_WRITE_FIX
        previous = max((s for s in self._committed_steps() if s != step), default=None)
        if previous is not None:
            kept = f"the previous checkpoint step {previous} is intact"
        elif self.saved:
            last = self.saved[-1]
            kept = f"the ones saved before (the last at step {last}) are gone from {self.directory}: was it removed?"
        else:
            kept = "none was written before"
        return f"checkpoint for step {step} could not be written ({reason}); {kept}: {fix}"

    def _discard_uncommitted(self, step: int) -> None:
        """After a failed save: remove its temporary files, and its entry if it never got a sidecar."""
        for path in self._temporaries():
            remove(path)
        if not self._sidecar(step).exists():
            remove(self.directory / self._entry(step))

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step`; newer ones are an abandoned run's and left alone.

        Sidecars go first, so a checkpoint half-deleted by a crash reads as incomplete, not corrupt.
        """
        committed = [s for s in self._committed_steps() if s <= step]
        doomed = set(committed[: -self.keep]) | {s for s in self._entry_steps() if s < step and s not in committed}
        for old in sorted(doomed):
            try:
                self._sidecar(old).unlink(missing_ok=True)
                for path in self._paths_of(old):
                    remove(path)
            except OSError as exc:
                log.warning(f"could not remove old checkpoint step {old} ({exc.strerror}); remove it by hand")
        for path in self._temporaries():
            remove(path)

    # -- loading

    def load_latest(self) -> int | None:
        """Restore every part from the newest usable checkpoint; returns its step, or None when there is none.

        Call before the first optimizer step, with gradients unset. A checkpoint that is damaged or
        not plain data is skipped (one warning line); when every committed one is, this refuses. One
        pruned while it is read is no damage: the newest is read again (see the module docstring).
        """

        def apply(step: int, header: dict[str, Any]) -> int:
            self._check_usable(step, header)
            self._apply(step, header)
            return step

        return self._newest_usable(apply)

    def load_newest_into(self, make_parts: Callable[[dict[str, Any]], dict[str, Stateful]]) -> tuple[int, Any] | None:
        """For a reader whose parts follow the checkpoint: (step, header) of the newest usable checkpoint, after
        make_parts(its header) built the parts (e.g. a model of its config) and they were loaded from it."""

        def apply(step: int, header: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            self.parts = make_parts(header)
            self._check_usable(step, header)
            self._apply(step, header)
            return step, header

        return self._newest_usable(apply)

    def newest_header(self) -> tuple[int, dict[str, Any]] | None:
        """The newest usable checkpoint's step and header (its config, its layout), verified but not loaded.

        A damaged one is skipped with a warning line, as load_latest does, and when every committed one
        is, this refuses as load_latest does; None when none was written.
        """
        return self._newest_usable(lambda step, header: (step, header))

    def _newest_usable(self, use: Callable[[int, dict[str, Any]], T]) -> T | None:
        """use(step, header) of the newest checkpoint that passes its checks, listing them again when one is pruned."""
        for _ in range(READ_ROUNDS):
            try:
                return self._read_newest(use)
            except _Pruned:
                continue
        raise CheckpointError(
            f"the checkpoints in {self.directory} were replaced {READ_ROUNDS} times while being read: the run is "
            "still training and prunes each one soon after the next (train.keep_ckpts); nothing is damaged: "
            "try again, or once the run has finished"
        )

    def _read_newest(self, use: Callable[[int, dict[str, Any]], T]) -> T | None:
        damaged: list[str] = []
        listed = from_rank0(self._listing() if self.rank == 0 else ([], []))
        steps, committed = listed
        for step in steps:
            header = self._verified_header(step)
            if isinstance(header, Unusable):
                if step in committed and self._pruned(step):
                    raise _Pruned
                if self.rank == 0:
                    log.warning(f"{header.reason}; trying the one before")
                if header.committed:
                    damaged.append(self._entry(step))
                continue
            try:
                return use(step, header)
            except CheckpointError:
                if self._pruned(step):
                    raise _Pruned from None
                raise
        if damaged:
            raise EveryCheckpointDamaged(str(self.directory), damaged)
        return None

    def _listing(self) -> tuple[list[int], list[int]]:
        """Every step with an entry or a sidecar, newest first, and those whose sidecar exists (committed)."""
        return self._candidate_steps(), self._committed_steps()

    def _pruned(self, step: int) -> bool:
        """A committed checkpoint whose sidecar is gone now: pruned (sidecars go first), on every rank's word."""
        return bool(from_rank0(not self._sidecar(step).exists() if self.rank == 0 else None))

    def listed_steps(self) -> list[int]:
        """Every step with an entry or a sidecar on disk, newest first: complete, damaged or unfinished (any rank)."""
        return self._candidate_steps()

    def latest_step(self) -> int | None:
        """The newest complete step (sidecar valid, file sizes right), without hashing or loading; any rank."""
        for step in self._candidate_steps():
            sidecar = read_sidecar(self._sidecar(step), self._entry(step))
            usable = isinstance(sidecar, dict) and sidecar["format"] == FORMAT_VERSION
            if usable and listing_problem(self.directory, self._entry(step), sidecar["files"]) is None:
                return step
        return None

    def _verified_header(self, step: int) -> dict[str, Any] | Unusable:
        """The checkpoint's header on every rank, or why it is unusable."""
        name = self._entry(step)
        sidecar = from_rank0(read_sidecar(self._sidecar(step), name) if self.rank == 0 else None)
        committed = bool(from_rank0(self._sidecar(step).exists() if self.rank == 0 else None))
        if isinstance(sidecar, str):
            return Unusable(sidecar, committed)
        self._check_format(step, sidecar["format"])
        self._check_visible(step)
        files = sidecar["files"]
        problem = listing_problem(self.directory, name, files) if self.rank == 0 else None
        if problem is None:
            problem = checksum_problem(self.directory, sorted(files)[self.rank :: self.world_size], files)
        problem = first_problem(problem)
        if problem:
            return Unusable(problem, committed)
        header, problem = None, None
        try:
            header = storage.read_header(self.directory / name)
        except Exception as exc:
            problem = read_problem(name, exc)
        else:
            if not _valid_header(header, step):
                problem = f"checkpoint {name} has a malformed header; skipped"
        problem = first_problem(problem)
        return Unusable(problem, committed) if problem else header

    def _check_format(self, step: int, found: Any) -> None:
        if found != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self._entry(step)} is from another torchrig checkpoint format ({found!r}; this version "
                f"reads {FORMAT_VERSION}); resume it with the torchrig version that wrote it, or use a fresh RUN_DIR"
            )

    def _check_usable(self, step: int, header: dict[str, Any]) -> None:
        """A checkpoint of another strategy, config or set of parts is a change, not damage: refuse it."""
        if self.strategy is not None and header.get("strategy") != self.strategy:
            raise mismatch("train.strategy", header.get("strategy"), self.strategy)
        if self.config is not None and isinstance(header["config"], dict):
            check_compatible(header["config"], self.config)
        missing = sorted(set(self.parts) - set(header["part_names"]))
        if missing:
            raise CheckpointError(
                f"checkpoint {self._entry(step)} holds no state for {', '.join(missing)} "
                f"(it holds {', '.join(header['part_names'])}); use a new RUN_DIR"
            )

    def _apply(self, step: int, header: dict[str, Any]) -> None:
        """Load the tensors into the parts' current state (DCP reads in place, resharding), then hand each its state."""
        try:
            current, _ = storage.split_tensors({name: part.state_dict() for name, part in self.parts.items()})
            saved = {name: tree for name, tree in header["tensors"].items() if name in self.parts}
            tensors = storage.targets(saved, current)
            storage.read_tensors(self.directory / self._entry(step), tensors)
            for name, part in self.parts.items():
                part.load_state_dict(storage.merge(tensors.get(name, {}), header["parts"].get(name, {})))
        except failures() as exc:
            raise CheckpointError(
                f"checkpoint step {step} does not fit this run's state ({first_line(exc)}); "
                "use a new RUN_DIR or restore the config"
            ) from exc

    def _check_visible(self, step: int) -> None:
        """Every rank reads the files rank 0 found; a rank that cannot see them means RUN_DIR is not shared."""
        entry = self.directory / self._entry(step)
        seen = all_gather(entry.exists())
        if seen[0] and not all(seen):
            raise CheckpointError(
                f"rank {seen.index(False)} cannot see {entry}, which rank 0 can; "
                "put RUN_DIR on storage that every node shares"
            )

    # -- the directory

    @staticmethod
    def _entry(step: int) -> str:
        return f"step-{step:06d}"

    def _sidecar(self, step: int) -> Path:
        return self.directory / f"{self._entry(step)}.json"

    @staticmethod
    def _step_of(name: str) -> int:
        return int(STEP_PATTERN.match(name).group(1))

    def _entries(self) -> list[str]:
        try:
            return [p.name for p in self.directory.iterdir()]
        except OSError:
            return []

    def _paths_of(self, step: int) -> list[Path]:
        return [self.directory / n for n in self._entries() if STEP_PATTERN.match(n) and self._step_of(n) == step]

    def _entry_steps(self) -> set[int]:
        return {self._step_of(n) for n in self._entries() if STEP_PATTERN.match(n)}

    def _committed_steps(self) -> list[int]:
        return sorted(self._step_of(n) for n in self._entries() if STEP_PATTERN.match(n) and n.endswith(".json"))

    def _candidate_steps(self) -> list[int]:
        """Every step with an entry or a sidecar, newest first: incomplete ones are reported, then skipped."""
        return sorted(self._entry_steps(), reverse=True)

    def _temporaries(self) -> list[Path]:
        return [self.directory / n for n in self._entries() if n.startswith(TEMP_PREFIX)]


def load_model(run_dir: Path, model: nn.Module) -> int | None:
    """The newest usable checkpoint's model weights into `model`, in this one process, whatever the strategy
    and world size that saved it (for evaluation, sampling, export). Returns its step; None when there is none."""
    return Checkpointer(
        run_dir, {"model": ModelState(model)}, keep=1, rank=0, world_size=1, strategy=None
    ).load_latest()


def read_model(
    run_dir: Path, build: Callable[[dict[str, Any]], nn.Module]
) -> tuple[nn.Module, dict[str, Any], int] | None:
    """The newest usable checkpoint's model, built by build(its saved config) and loaded, in this one process:
    (model, config, step), the config and the weights of one checkpoint even while the run prunes; None: none."""
    models: list[nn.Module] = []

    def parts(header: dict[str, Any]) -> dict[str, Stateful]:
        models[:] = [build(header.get("config") or {})]
        return {"model": ModelState(models[0])}

    found = Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).load_newest_into(parts)
    if found is None:
        return None
    step, header = found
    return models[0], header.get("config") or {}, step
