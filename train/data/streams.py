"""Opening the inputs of `make prepare`: regular files only, never a blocking open, and gzip or zstd
decompressed as a stream in bounded memory, with a damaged or truncated file one line."""

from __future__ import annotations

import gzip
import io
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from train.errors import DataError

HEAD_BYTES = 1 << 16
READ_BLOCK = 1 << 20
# zstd input is fed from this many bytes up, so that one step never makes more than a few MiB (below).
ZSTD_FIRST_STEP = 64
ZSTD_MAX_OUTPUT = 8 << 20


@dataclass(frozen=True)
class Compression:
    name: str
    magic: bytes
    suffix: str


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", ".gz"),
    Compression("zstd", b"\x28\xb5\x2f\xfd", ".zst"),
)

def read_head(path: Path, count: int = HEAD_BYTES) -> bytes:
    """The first bytes of a regular file, opened without blocking (a FIFO planted as input never hangs)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"cannot read the input {path} ({exc.strerror}); check its permissions or leave it out") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"the input {path} is not a regular file; give files or a datasets directory")
        return os.read(fd, count)
    except OSError as exc:
        raise DataError(f"cannot read the input {path} ({exc.strerror}); check its permissions or leave it out") from None
    finally:
        os.close(fd)


def read_small(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes when it holds at most `limit`; None when it is absent, special or larger.

    Opened without blocking, unlike env.common.readfile.read_regular: a FIFO planted as a manifest,
    a datasets state.json or a tokenizer.json never hangs the reader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(limit + 1)[:limit]
    except OSError:
        return None
    finally:
        os.close(fd)


def need(package: str, why: str) -> Any:
    """Import an optional package, or one DataError line naming the install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        name = {"pyarrow.parquet": "pyarrow", "pyarrow.ipc": "pyarrow"}.get(package, package)
        raise DataError(f"{why} needs the {name} package: pip install {name} (the image has it)") from None


class _ZstdRaw(io.RawIOBase):
    """A zstd stream (frames one after another) as a raw file, in bounded memory.

    A stream cut short is an error, not an end. zstd can expand a few bytes into megabytes, and its
    decompressor returns all it can make of what it is fed, so it is fed little at a time: the
    step doubles while the output stays small and shrinks as soon as a step makes much of it.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.zstd = need("zstandard", "reading .zst")
        self.raw = raw
        self.decoder = self.zstd.ZstdDecompressor().decompressobj()
        self.compressed = b""
        self.pending = b""
        self.step = ZSTD_FIRST_STEP
        self.started = False

    def readable(self) -> bool:
        return True

    def _feed(self) -> bool:
        """Decompress one step of input into pending; False at the end of the input."""
        if not self.compressed:
            self.compressed = self.raw.read(READ_BLOCK)
            if not self.compressed:
                if self.started and not self.decoder.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return False
        self.started = True
        if self.decoder.eof:  # a new frame follows the last one
            self.compressed = self.decoder.unused_data + self.compressed
            self.decoder = self.zstd.ZstdDecompressor().decompressobj()
        piece, self.compressed = self.compressed[: self.step], self.compressed[self.step :]
        self.pending = self.decoder.decompress(piece)
        if self.decoder.eof and self.decoder.unused_data:  # the rest belongs to the next frame
            self.compressed = self.decoder.unused_data + self.compressed
            self.decoder = self.zstd.ZstdDecompressor().decompressobj()
        if len(self.pending) > ZSTD_MAX_OUTPUT:
            self.step = max(ZSTD_FIRST_STEP, self.step // 16)
        elif len(self.pending) < ZSTD_MAX_OUTPUT // 16:
            self.step = min(READ_BLOCK, self.step * 2)
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            if not self._feed():
                return 0
        count = min(len(buffer), len(self.pending))
        buffer[:count] = self.pending[:count]
        self.pending = self.pending[count:]
        return count


def _corrupt(path: Path, compression: str, exc: BaseException) -> DataError:
    detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    return DataError(f"{path} is a damaged {compression} file ({detail}); fetch or compress it again")


def _compression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class Stream:
    """A file's bytes, decompressed, from an offset; `disk()` is how far into the file on disk it is."""

    def __init__(self, path: Path, compression: str | None, offset: int) -> None:
        self.path, self.compression = path, compression
        try:
            self.raw = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), "rb")
        except OSError as exc:
            raise DataError(f"cannot read the input {path} ({exc.strerror}); check it or leave it out") from None
        self.errors = _compression_errors()
        if compression == "gzip":
            self.file: IO[bytes] = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif compression == "zstd":
            self.file = io.BufferedReader(_ZstdRaw(self.raw), READ_BLOCK)
        else:
            self.file = self.raw
        if offset:
            self._skip(offset)

    def _skip(self, offset: int) -> None:
        if self.compression is None:
            self.raw.seek(offset)
            return
        left = offset
        while left:
            got = len(self.read(min(left, READ_BLOCK)))
            if not got:
                raise DataError(f"{self.path} is shorter than when it was prepared; prepare it from the start")
            left -= got

    def read(self, count: int) -> bytes:
        return self._guard(lambda: self.file.read(count))

    def readline(self, limit: int) -> bytes:
        return self._guard(lambda: self.file.readline(limit))

    def _guard(self, call: Callable[[], bytes]) -> bytes:
        try:
            return call()
        except self.errors as exc:
            raise _corrupt(self.path, self.compression or "compressed", exc) from None
        except OSError as exc:
            raise DataError(f"cannot read the input {self.path} ({exc.strerror}); check it") from None

    def disk(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.file.close()
        self.raw.close()
