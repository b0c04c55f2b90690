"""Turn text files into a token file for data.source=files (`make prepare`).

    python -m train.prepare --input 'corpus/*.txt' --output data/x.bin [--tokenizer bytes|bpe|PATH] [--vocab 8192]

--tokenizer bytes (the default): each file's bytes are its tokens, then a NUL separator, stored
as uint8. --tokenizer bpe: trains a byte-level BPE of --vocab tokens on the input
(deterministic: the same files give the same tokenizer) and writes it to data/x.tokenizer.json;
--tokenizer PATH uses an existing tokenizer.json (any model's works offline). Each document then
ends with <|endoftext|>, and the ids are stored in the smallest dtype that fits (uint16 up to 65,536
tokens, else uint32). The sidecar data/x.json records dtype, count, vocab_size and the
tokenizer's file, sha256 and size (format: train/data/tokens.py).

Files that prepare did not write (data/x.bin, data/x.json, data/x.tokenizer.json) are never
replaced without --force. Train with ARGS="data.path=data/x.bin model.vocab_size=auto".
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from env.common.atomic import replace_atomically
from env.common.cli import ArgumentParser, count_arg, run_cli
from env.common.outputs import OutputLock, remove_leftovers
from env.common.readfile import ReadRefused, read_json
from train.data.text import expand_globs
from train.data.tokens import BYTE_VOCAB, SIDECAR_LIMIT, TOKEN_DTYPES, sidecar_path, token_dtype, write_token_file
from train.errors import DataError
from train.tokenizer import (
    BYTES_RECORD,
    EncodingAudit,
    end_of_text_id,
    parse_tokenizer,
    read_tokenizer_bytes,
    sha256_of,
    train_bpe,
)

WRITER = "train.prepare"
# Texts are encoded in pieces of about this size, cut after a newline: memory stays bounded on
# large files, and the cut points (so the tokens) depend only on the text.
PIECE_BYTES = 1 << 20
PROGRESS_EVERY_S = 2.0
ENCODE_BATCH = 8  # pieces per encode_batch call: progress between calls
DEFAULT_VOCAB = 8192


def tokenizer_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.stem + ".tokenizer.json")


class Progress:
    """Bytes read out of a known total, with throughput and an ETA, every few seconds on stderr."""

    def __init__(self, what: str, total: int, out: TextIO = sys.stderr) -> None:
        self.what, self.total, self.out = what, total, out
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            self.out.write(
                f"prepare: {self.what} {self.done / 2**20:,.1f} of {self.total / 2**20:,.1f} MiB "
                f"({self.done / max(self.total, 1):.0%}), {rate / 2**20:,.1f} MiB/s, eta {eta:.0f} s\n"
            )
            self.out.flush()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read the input {path} ({exc.strerror}); check its permissions or leave it out"
        ) from None


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"the input {path} is not UTF-8 text (byte {exc.start}); a BPE needs text: drop it or use TOKENIZER=bytes"
        ) from None


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        cut = text.find("\n", start + PIECE_BYTES)
        end = len(text) if cut < 0 else cut + 1
        yield text[start:end]
        start = end


def _texts(files: list[Path], progress: Progress) -> Iterator[str]:
    for path in files:
        for piece in _pieces(_text(path, _read(path))):
            yield piece
            progress.add(len(piece.encode("utf-8")))


def _byte_chunks(files: list[Path], progress: Progress) -> Iterator[np.ndarray]:
    for path in files:
        data = _read(path)
        progress.add(len(data))
        yield np.frombuffer(data + b"\x00", dtype=np.uint8)


def _token_chunks(files: list[Path], tokenizer: Any, separator: int | None, progress: Progress) -> Iterator[np.ndarray]:
    for path in files:
        pieces = list(_pieces(_text(path, _read(path))))
        for start in range(0, len(pieces), ENCODE_BATCH):
            batch = pieces[start : start + ENCODE_BATCH]
            ids = [encoding.ids for encoding in tokenizer.encode_batch(batch)]
            progress.add(sum(len(piece.encode("utf-8")) for piece in batch))
            yield np.fromiter((i for piece in ids for i in piece), dtype=np.int64)
        if separator is not None:
            yield np.array([separator], dtype=np.int64)


def encode_files(files: list[Path], tokenizer: Any) -> Iterator[np.ndarray]:
    """Each file's text through the tokenizer, each document ended by its end-of-text id, as prepare writes them."""
    return _token_chunks(files, tokenizer, end_of_text_id(tokenizer), Progress("tokenized", 0))


def _is_ours(bin_path: Path) -> bool:
    """A sidecar prepare wrote (or the byte prepare before it), describing the .bin beside it."""
    try:
        meta = read_json(sidecar_path(bin_path), SIDECAR_LIMIT)
        expected = int(meta["count"]) * TOKEN_DTYPES[meta["dtype"]].itemsize
        return {"dtype", "count", "vocab_size", "sha256"} <= meta.keys() and (
            not bin_path.exists() or bin_path.stat().st_size == expected
        )
    except (OSError, ReadRefused, ValueError, KeyError, TypeError):
        return False


def check_overwrite(bin_path: Path, tokenizer_out: Path | None, force: bool) -> None:
    """Refuse to replace a file that prepare did not write, unless forced."""
    if force:
        return
    meta_path = sidecar_path(bin_path)
    if meta_path.exists() and not _is_ours(bin_path):
        raise DataError(f"{meta_path} exists and was not written by prepare; move it away or pass FORCE=1")
    if bin_path.exists() and not meta_path.exists():
        raise DataError(f"{bin_path} exists and was not written by prepare; move it away or pass FORCE=1")
    if tokenizer_out is not None and tokenizer_out.exists():
        recorded = (read_json(meta_path, SIDECAR_LIMIT).get("tokenizer") or {}) if meta_path.exists() else {}
        if recorded.get("sha256") != sha256_of(tokenizer_out):
            raise DataError(f"{tokenizer_out} exists and was not written by prepare; move it away or pass FORCE=1")


def prepare(inputs: list[str], output: str, tokenizer_arg: str, vocab: int, force: bool) -> dict[str, Any]:
    if not output.endswith(".bin"):
        raise DataError(f"OUTPUT={output!r} must end in .bin, e.g. data/mycorpus.bin")
    bin_path = Path(output)
    # prepare's own outputs are never its input: a glob over their folder would read a rerun's token file as text
    own = {p.resolve() for p in (bin_path, sidecar_path(bin_path), tokenizer_path(bin_path))}
    files = [p for p in expand_globs(inputs, "INPUT", "check the path and quote globs") if p.resolve() not in own]
    if not files:
        raise DataError(f"INPUT={' '.join(inputs)!r} matches only this prepare's own outputs; give the text files")
    total = 0
    for path in files:
        try:
            total += path.stat().st_size
        except OSError as exc:
            raise DataError(f"cannot read the input {path} ({exc.strerror}); check it or leave it out") from None
    kind = "bytes" if tokenizer_arg == "bytes" else "bpe" if tokenizer_arg == "bpe" else "file"
    tokenizer_out = tokenizer_path(bin_path) if kind != "bytes" else None
    given = Path(tokenizer_arg) if kind == "file" else None
    if given is not None and not given.is_file():
        raise DataError(f"TOKENIZER={tokenizer_arg!r} is neither bytes, bpe nor an existing tokenizer.json")
    if given is not None and tokenizer_out is not None and given.resolve() == tokenizer_out.resolve():
        tokenizer_out = None  # the tokenizer already lies where it would be copied
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    # One prepare writes these files at a time; what a killed one left of them is removed (env/common/outputs.py).
    with OutputLock(bin_path, "OUTPUT"):
        remove_leftovers(
            bin_path.parent, [p.name for p in (bin_path, sidecar_path(bin_path), tokenizer_path(bin_path))]
        )
        return _prepare_owned(files, bin_path, kind, given, tokenizer_out, vocab, force, total)


def _prepare_owned(
    files: list[Path], bin_path: Path, kind: str, given: Path | None, tokenizer_out: Path | None, vocab: int,
    force: bool, total: int,
) -> dict[str, Any]:  # fmt: skip
    check_overwrite(bin_path, tokenizer_out, force)
    if kind == "bytes":
        chunks = _byte_chunks(files, Progress("tokenized", total))
        return write_token_file(bin_path, chunks, BYTE_VOCAB, tokenizer=BYTES_RECORD, meta=_meta(files, {}))
    if kind == "bpe":
        tokenizer = train_bpe(_texts(files, Progress("BPE training read", total)), vocab)
    else:
        given_bytes = read_tokenizer_bytes(given)  # parsed from the very bytes that are copied below
        tokenizer = parse_tokenizer(given_bytes, given)
    separator = end_of_text_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    final = tokenizer_path(bin_path)
    # The tokenizer file is written last, after the sidecar that records its sha256: an interrupted
    # prepare leaves no tokenizer.json that a rerun would take for a stranger's.
    content = tokenizer.to_str(pretty=True).encode() if kind == "bpe" else given_bytes
    record = {"kind": kind, "file": final.name, "sha256": hashlib.sha256(content).hexdigest(),
              "vocab_size": vocab_size, "end_of_document": separator}  # fmt: skip
    progress = Progress("tokenized", total)
    audit = EncodingAudit(tokenizer, separator, f"TOKENIZER={given or kind}")
    chunks = audit.stream(_token_chunks(files, tokenizer, separator, progress), lambda: progress.done)
    info = write_token_file(
        bin_path, chunks, vocab_size, tokenizer=record, dtype=token_dtype(vocab_size), meta=_meta(files, {})
    )
    if tokenizer_out is not None:
        try:
            replace_atomically(final, lambda out: out.write(content), "wb")
        except OSError as exc:
            raise DataError(f"cannot write {final} ({exc.strerror}); choose a writable OUTPUT") from None
    return info


def _meta(files: list[Path], extra: dict[str, Any]) -> dict[str, Any]:
    return {"written_by": WRITER, "files": len(files), "bytes": sum(p.stat().st_size for p in files), **extra}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="GLOB",
        help="text files or globs (** recurses); quote globs, repeat or list several",
    )
    parser.add_argument(
        "--output", required=True, metavar="PATH.bin", help="the token file to write; its .json sidecar goes next to it"
    )
    parser.add_argument("--tokenizer", default="bytes", help="bytes (default), bpe (train one), or a tokenizer.json")
    parser.add_argument("--vocab", type=count_arg("VOCAB"), help=f"vocabulary size of a trained BPE ({DEFAULT_VOCAB})")
    parser.add_argument("--force", action="store_true", help="replace files that prepare did not write (FORCE=1)")
    args = parser.parse_args(argv)
    if args.vocab is not None and args.tokenizer != "bpe":
        raise DataError(
            f"VOCAB={args.vocab} sets the size of a BPE that prepare trains, so it needs TOKENIZER=bpe; "
            f"TOKENIZER={args.tokenizer} has its own vocabulary: drop VOCAB or set TOKENIZER=bpe"
        )
    vocab = DEFAULT_VOCAB if args.vocab is None else args.vocab
    if vocab > 2**32:
        raise DataError(f"VOCAB={vocab} does not fit a uint32 token file; use at most {2**32}")
    try:
        info = prepare(args.input, args.output, args.tokenizer, vocab, args.force)
    except OSError as exc:
        raise DataError(f"cannot write {args.output} ({exc.strerror}); choose a writable OUTPUT") from None
    tokenizer = info.get("tokenizer")
    extra = f", tokenizer {tokenizer['file']} (vocab {tokenizer['vocab_size']:,})" if "file" in tokenizer else ""
    print(
        f"wrote {args.output} and {sidecar_path(Path(args.output))}: {info['count']:,} {info['dtype']} tokens "
        f"from {info['files']} files{extra}; train with make train "
        + shlex.quote(f"ARGS=data.path={args.output} model.vocab_size=auto")
    )
    return 0


if __name__ == "__main__":
    run_cli("prepare", main)
