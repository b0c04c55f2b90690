"""Writing a set of token shards (`make prepare`), resumably: what a SIGKILL leaves, a rerun finishes.

OUTPUT=data/x.bin names the set. Shards are data/x.000000.bin, data/x.000001.bin, … of SHARD_TOKENS
ids each (the last one shorter), raw like any token file or, with SHARD_FORMAT=llmc, llm.c files; a
set of one shard is data/x.bin itself. The manifest data/x.json is the set's sidecar
(train/data/tokens.py) and is rewritten atomically after every shard: the shards so far, each with
the cursor it starts at (input, offset, records before it, ids of that unit to skip), and the
cursor of the next one. A shard is written to a temporary file and renamed whole when full, so a
crash loses at most the shard being written. A set with a mask (chat data, train/data/chat.py) has one
mask file per shard beside it, data/x.000000.mask (data/x.mask for a set of one shard): a uint8 per id,
1 where the loss learns that token, written and renamed with its shard; and the counts a chat prepare
reports (its tally) are kept with each cursor, so a resumed prepare reports the whole set. One prepare
writes a set at a time (an flock on .NAME.bin.lock), and a file beside it that prepare did not write is never replaced unasked. A rerun of the same prepare (same inputs, sizes and
times, tokenizer and settings: the plan) checks each listed shard's length and sha256, keeps the
good ones in order, and goes on from the first one missing or damaged; any other rerun starts
afresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import numpy as np

from env.common.atomic import TEMP_PREFIX, create_exclusive, fsync_dir, replace_atomically
from train.data import llmc
from train.data.formats import Unit
from train.data.tokens import SHARD_HEADERS, TOKEN_DTYPES, read_sidecar, sidecar_path
from train.errors import DataError
from train.tokenizer import sha256_of

WRITER = "train.prepare"
START: tuple[int, int, int, int] = (0, 0, 0, 0)  # (input, offset, records before it, ids of that unit to skip)
HASH_BLOCK = 16 << 20
MASK_SUFFIX = ".mask"
# The manifest is rewritten after every shard: this many keeps it a few MB and the rewrites cheap.
MAX_SHARDS = 10_000


@dataclass(frozen=True)
class SetPaths:
    """The files of the set OUTPUT names."""

    output: Path  # data/x.bin

    @property
    def folder(self) -> Path:
        return self.output.parent

    @property
    def stem(self) -> str:
        return self.output.name[: -len(".bin")]

    @property
    def manifest(self) -> Path:
        return sidecar_path(self.output)

    @property
    def tokenizer(self) -> Path:
        return self.folder / f"{self.stem}.tokenizer.json"

    @property
    def lock(self) -> Path:
        return self.folder / f".{self.output.name}.lock"

    def shard(self, index: int) -> Path:
        return self.folder / f"{self.stem}.{index:06d}.bin"

    @staticmethod
    def mask_of(shard: Path) -> Path:
        """The mask file beside a shard: x.000000.bin -> x.000000.mask, x.bin -> x.mask."""
        return shard.with_suffix(MASK_SUFFIX)

    def shard_names(self, suffix: str = ".bin") -> re.Pattern[str]:
        return re.compile(rf"{re.escape(self.stem)}(\.[0-9]{{6}})?{re.escape(suffix)}")

    def existing_shards(self, suffix: str = ".bin") -> list[Path]:
        """x.bin and x.NNNNNN.bin (or their masks, suffix .mask) as they lie in the folder now."""
        pattern = self.shard_names(suffix)
        try:
            return sorted(p for p in self.folder.iterdir() if pattern.fullmatch(p.name))
        except OSError:
            return []

    def own_names(self) -> set[str]:
        """What prepare may leave beside OUTPUT (and so the names its own temporary files carry)."""
        return {self.output.name, self.manifest.name, self.tokenizer.name}

    def remove_leftovers(self) -> list[Path]:
        """Temporary files an interrupted prepare of this OUTPUT left (the caller holds the set's lock)."""
        own = "|".join(re.escape(n) for n in self.own_names())
        own += "|" + self.shard_names().pattern + "|" + self.shard_names(MASK_SUFFIX).pattern
        pattern = re.compile(rf"{re.escape(TEMP_PREFIX)}({own})\.[0-9a-f]{{16}}")
        removed = []
        for path in self.folder.iterdir() if self.folder.is_dir() else []:
            if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
        return removed


# ---------------------------------------------------------------------------- the set's owner


class OutputLock:
    """An exclusive flock on .NAME.bin.lock beside the output, for the whole prepare: one writer per OUTPUT."""

    def __init__(self, paths: SetPaths) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(paths.lock, flags, 0o644)
        except OSError as exc:
            raise DataError(f"cannot lock {paths.lock} ({exc.strerror}); choose a writable OUTPUT") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise DataError(
                f"another make prepare ({holder}) is writing {paths.output}; wait for it or choose another OUTPUT"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())

    def release(self) -> None:
        os.close(self.fd)


def own_manifest(paths: SetPaths) -> dict[str, Any] | None:
    """The manifest beside OUTPUT when prepare wrote it (any version), else None."""
    if not paths.manifest.exists() and not paths.manifest.is_symlink():
        return None
    try:
        meta = read_sidecar(paths.manifest)
    except DataError:
        return None
    if meta.get("written_by") != WRITER or not {"dtype", "count", "vocab_size"} <= meta.keys():
        return None
    return meta


def check_overwrite(
    paths: SetPaths, manifest: dict[str, Any] | None, force: bool, out: TextIO, given: str | None = None
) -> None:
    """Refuse to replace files prepare did not write, unless forced (and then say which are replaced).

    With its own manifest beside OUTPUT, OUTPUT's shard names are prepare's; the tokenizer file is its
    own when its sha256 is the one the manifest records.
    """
    strangers: list[Path] = []
    if manifest is None:
        if paths.manifest.exists() or paths.manifest.is_symlink():
            strangers.append(paths.manifest)
        strangers += paths.existing_shards() + paths.existing_shards(MASK_SUFFIX)
    is_given = given is not None and Path(given).resolve() == paths.tokenizer.resolve()
    if (paths.tokenizer.exists() or paths.tokenizer.is_symlink()) and not is_given:
        recorded = (manifest or {}).get("tokenizer") or {}
        mine = paths.tokenizer.is_file() and not paths.tokenizer.is_symlink()
        if not (mine and recorded.get("sha256") == sha256_of(paths.tokenizer)):
            strangers.append(paths.tokenizer)
    if not strangers:
        return
    if not force:
        raise DataError(f"{strangers[0]} exists and was not written by prepare; move it away or pass FORCE=1")
    for path in strangers:
        out.write(f"prepare: FORCE=1: replacing {path}, which prepare did not write\n")
        path.unlink()


# ---------------------------------------------------------------------------- writing


def write_manifest(paths: SetPaths, manifest: dict[str, Any]) -> None:
    replace_atomically(paths.manifest, lambda out: out.write(json.dumps(manifest, indent=1) + "\n"), "w")


def _hash_shard(path: Path, header: int, digest: Any) -> str | None:
    """sha256 of a shard's ids (fed to `digest` too), or None when it cannot be read."""
    own = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            file.seek(header)
            while block := file.read(HASH_BLOCK):
                own.update(block)
                digest.update(block)
    except OSError:
        return None
    return own.hexdigest()


@dataclass
class Resume:
    """What a rerun keeps of an unfinished (or finished) set of the same plan."""

    shards: list[dict[str, Any]]
    cursor: tuple[int, int, int, int]
    digest: Any  # the running sha256 of the kept shards' ids
    count: int
    max_token: int
    tally: dict[str, int] = field(default_factory=dict)  # a chat prepare's counts up to the cursor


def _whole(path: Path, size: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size


def _mask_whole(paths: SetPaths, entry: dict[str, Any]) -> bool:
    """A shard's mask as recorded (length and sha256), or True for a shard without one."""
    mask = entry.get("mask")
    if mask is None:
        return True
    path = paths.folder / mask["file"]
    return _whole(path, entry["count"]) and _hash_shard(path, 0, hashlib.sha256()) == mask["sha256"]


def kept_shards(paths: SetPaths, manifest: dict[str, Any] | None) -> Resume:
    """The listed shards that are whole (length and sha256 as recorded, their masks too), in order up to the
    first that is not."""
    digest = hashlib.sha256()
    if manifest is None:
        return Resume([], START, digest, 0, -1)
    header = SHARD_HEADERS[manifest["shard_format"]]
    itemsize = TOKEN_DTYPES[manifest["dtype"]].itemsize
    kept: list[dict[str, Any]] = []
    for entry in manifest["shards"]:
        shard = paths.folder / entry["file"]
        whole = _whole(shard, header + entry["count"] * itemsize) and _mask_whole(paths, entry)
        trial = digest.copy()
        if not whole or _hash_shard(shard, header, trial) != entry["sha256"]:
            count = sum(e["count"] for e in kept)
            return Resume(kept, tuple(entry["start"]), digest, count, _max_of(kept), entry.get("tally", {}))
        digest = trial
        kept.append(entry)
    count = sum(e["count"] for e in kept)
    return Resume(kept, tuple(manifest["cursor"]), digest, count, _max_of(kept), manifest.get("tally", {}))


def _max_of(shards: list[dict[str, Any]]) -> int:
    return max((e["max_token"] for e in shards), default=-1)


class ShardWriter:
    """Appends each unit's ids (and mask) to the set; a full shard is published and recorded before the next one
    starts."""

    def __init__(
        self, paths: SetPaths, manifest: dict[str, Any], resume: Resume, shard_tokens: int, vocab_size: int
    ) -> None:
        self.paths = paths
        self.manifest = manifest  # the fixed part: plan, tokenizer, dtype, …
        self.shards = list(resume.shards)
        self.cursor = resume.cursor  # where the next shard starts
        self.after_last = resume.cursor  # where the unit after the last one added starts
        self.digest = resume.digest
        self.total = resume.count
        self.max_token = resume.max_token
        self.shard_tokens = shard_tokens
        self.vocab_size = vocab_size
        self.dtype = TOKEN_DTYPES[manifest["dtype"]]
        self.format = manifest["shard_format"]
        self.file: IO[bytes] | None = None
        self.temp: Path | None = None
        self.mask_file: IO[bytes] | None = None
        self.mask_temp: Path | None = None
        self.started: tuple[int, int, int, int] = START
        self.started_tally: dict[str, int] = {}
        self.count = 0
        self.own = hashlib.sha256()
        self.own_mask = hashlib.sha256()
        self.own_learned = 0
        self.own_max = -1
        self.tally = Counter(resume.tally)  # after the last unit added
        self.cursor_tally = dict(resume.tally)  # at the cursor

    def add(
        self,
        unit: Unit,
        tokens: np.ndarray,
        skip: int = 0,
        mask: np.ndarray | None = None,
        tally: dict[str, int] | None = None,
    ) -> None:
        """A unit's ids, of which the first `skip` are in finished shards already (a resumed unit); with its mask
        (one uint8 per id) and its counts, for a set with a mask."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(
                f"{unit.origin} gives token id {int(tokens.max())}, beyond the vocabulary of {self.vocab_size}; "
                "give the tokenizer these ids come from (TOKENIZER=…)"
            )
        before = dict(self.tally)
        after_unit = self.tally + Counter(tally or {})
        position = skip
        while position < len(tokens):
            if self.file is None:
                self._open((unit.file, *unit.start, position), before, mask is not None)
            take = min(len(tokens) - position, self.shard_tokens - self.count)
            self._append(tokens[position : position + take], None if mask is None else mask[position : position + take])
            position += take
            if self.count == self.shard_tokens:
                if position < len(tokens):
                    self._close((unit.file, *unit.start, position), before)
                else:
                    self._close(_after(unit), dict(after_unit))
        self.tally = after_unit
        self.after_last = _after(unit)
        if self.file is None:
            self.cursor, self.cursor_tally = self.after_last, dict(after_unit)

    def _open(self, start: tuple[int, int, int, int], tally: dict[str, int], masked: bool) -> None:
        if len(self.shards) >= MAX_SHARDS:
            raise DataError(
                f"SHARD_TOKENS={self.shard_tokens:,} makes more than {MAX_SHARDS:,} shards of this input; raise it"
            )
        name = self.paths.shard(len(self.shards))
        self.temp, self.file = create_exclusive(self.paths.folder, name.name)
        if masked:
            self.mask_temp, self.mask_file = create_exclusive(self.paths.folder, self.paths.mask_of(name).name)
        self.started, self.started_tally, self.count, self.own_max = start, tally, 0, -1
        self.own, self.own_mask, self.own_learned = hashlib.sha256(), hashlib.sha256(), 0
        if self.format == "llmc":
            self.file.write(llmc.header(0))

    def _append(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        raw = tokens.astype(self.dtype, copy=False).tobytes()
        assert self.file is not None
        self.file.write(raw)
        self.own.update(raw)
        self.digest.update(raw)
        if self.mask_file is not None:
            assert mask is not None and len(mask) == len(tokens)
            flags = mask.astype(np.uint8, copy=False).tobytes()
            self.mask_file.write(flags)
            self.own_mask.update(flags)
            self.own_learned += int(np.count_nonzero(mask))
        self.count += len(tokens)
        self.total += len(tokens)
        if len(tokens):
            self.own_max = max(self.own_max, int(tokens.max()))

    def _publish(self, file: IO[bytes], temp: Path, final: Path) -> None:
        try:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)

    def _close(self, after: tuple[int, int, int, int], tally: dict[str, int]) -> None:
        assert self.file is not None and self.temp is not None
        final = self.paths.shard(len(self.shards))
        if self.format == "llmc":
            self.file.seek(0)
            self.file.write(llmc.header(self.count))
        entry: dict[str, Any] = {"file": final.name, "count": self.count, "sha256": self.own.hexdigest(),
                                 "max_token": self.own_max}  # fmt: skip
        if self.mask_file is not None and self.mask_temp is not None:  # the mask first: a shard never lacks its own
            mask = self.paths.mask_of(final)
            self._publish(self.mask_file, self.mask_temp, mask)
            entry["mask"] = {"file": mask.name, "sha256": self.own_mask.hexdigest(), "learned": self.own_learned}
        self._publish(self.file, self.temp, final)
        entry["start"] = list(self.started)
        if self.started_tally:
            entry["tally"] = self.started_tally
        self.shards.append(entry)
        self.max_token = max(self.max_token, self.own_max)
        self.file, self.temp, self.mask_file, self.mask_temp = None, None, None, None
        self.cursor, self.cursor_tally = after, tally
        write_manifest(self.paths, self.snapshot(complete=False))

    def snapshot(self, complete: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {"tally": self.cursor_tally} if self.cursor_tally else {}
        if any("mask" in entry for entry in self.shards):
            learned = sum(entry["mask"]["learned"] for entry in self.shards)
            extra["mask"] = {"dtype": "uint8", "learned": learned}
        return {
            **self.manifest,
            "count": self.total,
            "sha256": self.digest.hexdigest(),
            "max_token": self.max_token,
            "complete": complete,
            "cursor": list(self.cursor),
            "shards": self.shards,
            **extra,
        }

    def finish(self) -> dict[str, Any]:
        """Publish the last shard; a set of one shard becomes OUTPUT itself; the manifest says complete."""
        if self.file is not None:
            self._close(self.after_last, dict(self.tally))
        if len(self.shards) == 1 and self.shards[0]["file"] != self.paths.output.name:
            only = self.shards[0]
            if "mask" in only:
                os.replace(self.paths.folder / only["mask"]["file"], self.paths.mask_of(self.paths.output))
                only["mask"]["file"] = self.paths.mask_of(self.paths.output).name
            os.replace(self.paths.folder / only["file"], self.paths.output)
            only["file"] = self.paths.output.name
        manifest = self.snapshot(complete=True)
        write_manifest(self.paths, manifest)
        listed = {entry["file"] for entry in self.shards} | {e["mask"]["file"] for e in self.shards if "mask" in e}
        for stale in self.paths.existing_shards() + self.paths.existing_shards(MASK_SUFFIX):  # an earlier set's
            if stale.name not in listed:
                stale.unlink()
        fsync_dir(self.paths.folder)
        return manifest

    def abandon(self) -> None:
        """An error or an interrupt: the shard being written is dropped, the finished ones stay."""
        for file, temp in ((self.file, self.temp), (self.mask_file, self.mask_temp)):
            if file is not None and temp is not None:
                file.close()
                temp.unlink(missing_ok=True)
        self.file = self.mask_file = None


def _after(unit: Unit) -> tuple[int, int, int, int]:
    """Where the unit after this one starts."""
    return (unit.file + 1, 0, 0, 0) if unit.last else (unit.file, *unit.end, 0)
