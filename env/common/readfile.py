"""The one reader of every file a user names or could plant: only a regular file, bounded, never a blocking open.

A config.json, manifest.json, sidecar or tokenizer.json is read by later launches, by eval, sample,
export, compare and prepare. Whatever sits at such a name must not hang or exhaust the reader:

- the open never blocks: O_NONBLOCK, so a FIFO planted at the name is opened at once (and refused)
  instead of waiting forever for a writer;
- what was opened is checked, not the name (fstat of the open file: no window for a swap after a
  stat), and only a regular file is read: a FIFO, a socket, a directory or a device (a link to
  /dev/zero, whose size reads as 0) is refused;
- at most `limit` bytes are read, and no more than the file's size when it was opened: a file
  growing under the reader, or a /proc file that reports size 0, cannot stretch the read;
- JSON is refused when nested deeper than a bound, counted on the text before it is parsed, so that
  neither the parser nor the code that walks the tree can reach Python's recursion limit.

`read_bounded` and `read_json` raise ReadRefused, whose `reason` completes "<path> <reason>";
`open_regular` and `read_regular` are the quiet forms (None) for records that may be absent.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

# A JSON record of the rig (config, sidecar, manifest, tokenizer) is a few levels deep; a tokenizer.json
# is about six. Far deeper is not one of ours, and would exhaust Python's recursion in json or in the
# code that walks the tree.
MAX_JSON_DEPTH = 32
_NONBLOCKING_READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a FIFO (a named pipe)"),
    (stat.S_ISSOCK, "is a socket"),
    (stat.S_ISCHR, "is a device"),
    (stat.S_ISBLK, "is a device"),
)
# A JSON string, escapes included (unrolled: no backtracking per character), for the depth count.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class ReadRefused(Exception):
    """A file that the reader refused; `reason` completes "<path> <reason>", e.g. "is a FIFO (a named pipe)"."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing  # nothing at all is at the path


def _size(limit: int) -> str:
    return f"{limit / 2**20:,.0f} MiB" if limit >= 2**20 else f"{limit:,} bytes"


def open_bounded(path: Path | str, limit: int | None, *, follow: bool = True) -> tuple[BinaryIO, int]:
    """(the file opened for reading, its size) when `path` is a regular file of at most `limit` bytes.

    limit None: any size. follow False: a symlink at `path` is refused too (O_NOFOLLOW), for a file
    that is copied out. Raises ReadRefused.
    """
    flags = _NONBLOCKING_READ | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ReadRefused("is a symlink to nothing") from None
        raise ReadRefused("does not exist", missing=True) from None
    except OSError as exc:
        if not follow and os.path.islink(path):
            raise ReadRefused("is a symlink, which is never copied out: put the file itself there") from None
        raise ReadRefused(f"cannot be read ({exc.strerror})") from None
    info = os.fstat(fd)  # of what was opened: no window for a swap after a stat of the name
    problem = next((what for is_kind, what in _KINDS if is_kind(info.st_mode)), None)
    if problem is None and not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    if problem is None and limit is not None and info.st_size > limit:
        problem = f"is {info.st_size / 2**20:,.1f} MiB, over the {_size(limit)} such a file may have"
    if problem is not None:
        os.close(fd)
        raise ReadRefused(problem)
    # Regular files never block; blocking mode again keeps reads whole.
    os.set_blocking(fd, True)
    # Named by its path (a memory map records it, to be reopened in a worker process), opened by this fd.
    return open(path, "rb", opener=lambda _name, _flags: fd), info.st_size


def read_bounded(path: Path | str, limit: int | None, *, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_bounded's rules); ReadRefused otherwise."""
    handle, size = open_bounded(path, limit, follow=follow)
    with handle:
        try:
            return handle.read(size)  # its size when opened: a file growing meanwhile is not followed
        except OSError as exc:
            raise ReadRefused(f"cannot be read ({exc.strerror})") from None


def json_depth(data: bytes) -> int:
    """How deeply the JSON text nests arrays and objects, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for bracket in _JSON_STRING.sub(b'""', data).translate(None, _NOT_A_BRACKET):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text as a tree; ReadRefused when it is not UTF-8, not JSON, or nested deeper than max_depth."""
    depth = json_depth(data)
    if depth > max_depth:
        raise ReadRefused(f"is nested {depth:,} levels deep, deeper than the {max_depth} of any file of ours")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ReadRefused("is not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as exc:
        raise ReadRefused(f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # unreachable after the depth count; kept so that no traceback can escape
        raise ReadRefused("is nested too deeply to be a file of ours") from None


def read_json(path: Path | str, limit: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A bounded JSON file (read_bounded, parse_json); ReadRefused with the reason otherwise."""
    return parse_json(read_bounded(path, limit), max_depth)


def open_regular(path: Path, limit: int) -> BinaryIO | None:
    """The file opened for reading when it is a regular file of at most `limit` bytes, else None."""
    try:
        return open_bounded(path, limit)[0]
    except ReadRefused:
        return None


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes; None when absent, unreadable, special or larger."""
    try:
        return read_bounded(path, limit)
    except ReadRefused:
        return None
