"""The few file operations that reading and writing model directories need, each one small function doing the
simplest safe thing, so that one shared mechanism can take its place later:

- `read_json` / `read_regular`: a regular file only (a FIFO or device never blocks or streams: opened
  non-blocking, checked by fstat on what was opened), bounded in size. A link to a regular file is read as
  that file: a Hugging Face hub snapshot is links into its blob store.
- `publishing(output, force)`: a directory written beside OUTPUT and moved into place at the end; a failure
  leaves OUTPUT as it was and removes what was written. A non-empty OUTPUT is refused without FORCE=1, and
  with it only the files named in OWNED_NAMES are replaced or removed (a user's own files stay).
- `check_fits(bytes, device)`: refuses, before anything is allocated, what the device's (or the host's)
  free memory cannot hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from env.common import readfile
from env.common.atomic import fsync_dir, make_temp_dir, write_fix
from env.common.cli import UserError
from train.errors import ConfigError

# A config.json, torchrig.json or tokenizer_config.json is kilobytes; DeepSeek-V3's weight index about 9 MB.
MAX_JSON_BYTES = 64 << 20
# A tokenizer.json: a 256K-token BPE is about 20 MB.
MAX_TOKENIZER_BYTES = 256 << 20
# What an export writes: forced exports replace or remove only these (either format, a previous release's too).
OWNED_NAMES = re.compile(
    r"config\.json|generation_config\.json|torchrig\.json|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
    r"|adapter_config\.json|adapter_model\.safetensors"
)


class WeightsError(ConfigError):
    """Weights cannot be found, read or used; one line with the fix. A ConfigError too, so the training
    worker reports it as one (train.init_from)."""


class OutputError(UserError):
    """An output directory that cannot be written; one line with the fix."""


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (env/common/readfile.py); WeightsError naming what
    the file is and `what` to do otherwise."""
    try:
        return readfile.read_bounded(path, limit)
    except readfile.ReadRefused as exc:
        raise WeightsError(f"{path} {exc.reason}; {what}") from None


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's content through the one bounded reader (env/common/readfile.py: a regular file of at most
    `limit` bytes, nested at most so deep); WeightsError naming what the file is and `what` to do otherwise."""
    try:
        return readfile.read_json(path, limit)
    except readfile.ReadRefused as exc:
        raise WeightsError(f"{path} {exc.reason}; {what}") from None


def is_regular(path: Path) -> bool:
    """A regular file (or a link to one) at path."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Publishing a directory


def check_output(output: Path, force: bool) -> None:
    """OUTPUT may be written: not a file, and empty unless FORCE=1."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"OUTPUT={output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError(f"OUTPUT={output} is not empty; choose an empty or new directory, or set FORCE=1 to replace")


@contextlib.contextmanager
def publishing(output: Path, force: bool, changes: list[str] | None = None) -> Iterator[Path]:
    """A staging directory beside `output` to write into; on success it becomes `output` (or, with FORCE=1 over
    a non-empty one, its files replace those of OWNED_NAMES there, and owned files it lacks go: `changes` gets
    "replaced NAME" and "removed NAME" for each, so that the caller says so). On any error the staging directory
    is removed and `output` is untouched."""
    check_output(output, force)
    parent = output.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(parent, output.name)
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    try:
        yield staging
        _move_into_place(staging, output, changes if changes is not None else [])
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cannot_write(output: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {output} ({exc.strerror}); {write_fix(exc).replace('RUN_DIR', 'OUTPUT')}")


def _move_into_place(staging: Path, output: Path, changes: list[str]) -> None:
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        staging.rename(output)
        fsync_dir(output.absolute().parent)
        return
    written = {path.name for path in staging.iterdir()}
    for stale in output.iterdir():
        if OWNED_NAMES.fullmatch(stale.name) and stale.name not in written and not stale.is_dir():
            stale.unlink()
            changes.append(f"removed {stale.name}")
    for name in sorted(written):
        if os.path.lexists(output / name):
            changes.append(f"replaced {name}")
        os.replace(staging / name, output / name)
    fsync_dir(output)


def write_json(path: Path, tree: Any) -> None:
    path.write_text(json.dumps(tree, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Memory


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory of the device, or of this host for the CPU (MemAvailable), and what it is."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available on this host"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available on this host"


def check_fits(needed: int, device: torch.device, what: str, fix: str) -> None:
    """WeightsError, before any allocation, when `needed` bytes exceed what `device` has free."""
    have, where = available_bytes(device)
    if needed > have:
        raise WeightsError(
            f"{what} needs {needed:,} bytes ({needed / 2**30:,.1f} GiB) and {have:,} bytes ({have / 2**30:,.1f} GiB) "
            f"are {where}; {fix}"
        )
