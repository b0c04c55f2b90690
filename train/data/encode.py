"""Units to token ids (`make prepare`'s work): each format's documents, through bytes or a tokenizer, in PROCS processes.

A document is encoded in pieces (train/data/formats.py cuts them) and ends with the end-of-document
id: NUL for bytes, the tokenizer's end-of-text token (train/tokenizer.py END_TOKENS) for a tokenizer,
none when it has none. Pieces are encoded without the tokenizer's own special tokens
(add_special_tokens=False): a BOS per piece would split a document. So the same text gives the same
ids whether it comes as a .txt file, a JSON line, a Parquet row or a datasets row.

Each process encodes with one thread (TOKENIZERS_PARALLELISM=false): PROCS counts cores. Results
come back in input order, at most WINDOW_PER_PROC units per process in flight, so memory stays
bounded however large the input is.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from env.rig.lifeline import end_with_parent
from train.data.formats import PIECE_BYTES, Unit, pieces_of
from train.errors import DataError

BYTE_END_OF_DOCUMENT = 0
# Units in flight per process: one being encoded, one queued, so a process never waits for work.
WINDOW_PER_PROC = 2
SERIAL = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def serial_tokenizers() -> None:
    """This process's tokenizers calls use one thread (set before the first call)."""
    os.environ.update(SERIAL)


# ---------------------------------------------------------------------------- documents of each format


def _decode(piece: bytes, origin: str, offset: int) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"the input {origin} is not UTF-8 text (byte {offset + exc.start:,}); a BPE needs text: "
            "drop it or use TOKENIZER=bytes"
        ) from None


def _pieces(text: str, as_text: bool) -> Iterator[tuple[str | bytes, bool]]:
    if len(text) * 4 < PIECE_BYTES:  # short (nearly every document): one piece, no need to measure its bytes
        yield (text if as_text else text.encode("utf-8")), True
        return
    pieces = pieces_of(text.encode("utf-8"))
    for number, piece in enumerate(pieces, start=1):
        yield (piece.decode("utf-8") if as_text else piece), number == len(pieces)


def _text_documents(unit: Unit, text_field: str, as_text: bool) -> Iterator[tuple[str | bytes, bool]]:
    offset = unit.start[0]
    for piece, ends in zip(unit.records, unit.ends):
        yield (_decode(piece, unit.origin, offset) if as_text else piece), ends
        offset += len(piece)


JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
              dict: "an object", str: "a string"}  # fmt: skip


def _json_kind(value: Any) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


def _jsonl_field(raw: bytes, text_field: str, origin: str, line: int) -> str:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DataError(f"{origin} line {line} is not JSON ({detail}); fix or remove that line") from None
    if not isinstance(record, dict):
        raise DataError(f"{origin} line {line} is {_json_kind(record)}, not an object with a {text_field!r} field")
    if text_field not in record:
        shown = ", ".join(list(record)[:20])
        raise DataError(
            f"{origin} line {line} has no field {text_field!r} (its fields: {shown or 'none'}); "
            "set TEXT_FIELD to the one with the text"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{origin} line {line}: {text_field!r} is {_json_kind(text)}, not a string")
    if b"\\ud" in raw.lower():  # only an escape can smuggle an unpaired surrogate into a JSON string
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{origin} line {line}: {text_field!r} holds an unpaired surrogate escape; fix it") from None
    return text


def _jsonl_documents(unit: Unit, text_field: str, as_text: bool) -> Iterator[tuple[str | bytes, bool]]:
    for line, raw in enumerate(unit.records, start=unit.start[1] + 1):
        if raw.strip():  # a blank line (a trailing newline, say) is no record
            yield from _pieces(_jsonl_field(raw, text_field, unit.origin, line), as_text)


def _row_documents(unit: Unit, text_field: str, as_text: bool) -> Iterator[tuple[str | bytes, bool]]:
    for text in unit.records:
        yield from _pieces(text, as_text)


DOCUMENTS = {
    "text": _text_documents,
    "jsonl": _jsonl_documents,
    "parquet": _row_documents,
    "datasets": _row_documents,
}


def documents(unit: Unit, text_field: str, as_text: bool) -> Iterator[tuple[str | bytes, bool]]:
    """A unit's document pieces, each with whether it ends its document; str for a tokenizer, else bytes."""
    return DOCUMENTS[unit.format](unit, text_field, as_text)


# ---------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class EncoderSpec:
    """What a tokenizer process needs, picklable: how to encode, and into what."""

    kind: str  # "bytes", "tokenizer", "copy" (llm.c tokens) or "chat" (conversations, train/data/chat.py)
    text_field: str
    dtype: str  # the token file's dtype
    tokenizer_json: str = ""
    end_of_document: int | None = None
    chat: Any = None  # the chat.ChatTemplate of a chat prepare


class ByteEncoder:
    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec

    def __call__(self, unit: Unit) -> np.ndarray:
        parts: list[bytes] = []
        for piece, ends in documents(unit, self.spec.text_field, as_text=False):
            parts.append(piece)  # type: ignore[arg-type]
            if ends:
                parts.append(b"\x00")
        return np.frombuffer(b"".join(parts), dtype=np.uint8)


class TokenizerEncoder:
    def __init__(self, spec: EncoderSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        # encode_batch_fast skips the character offsets nobody here reads (tokenizers >= 0.20)
        self.encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def __call__(self, unit: Unit) -> np.ndarray:
        pairs = list(documents(unit, self.spec.text_field, as_text=True))
        encodings = self.encode([piece for piece, _ in pairs], add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        end = self.spec.end_of_document
        if end is not None:
            ids = [piece + [end] if ends else piece for piece, (_, ends) in zip(ids, pairs)]
        total = sum(map(len, ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=self.spec.dtype, count=total)


class CopyEncoder:
    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec

    def __call__(self, unit: Unit) -> np.ndarray:
        if not unit.records:
            return np.zeros(0, self.spec.dtype)
        return np.concatenate(unit.records).astype(self.spec.dtype, copy=False)


def chat_encoder(spec: EncoderSpec) -> Any:
    """Conversations to ids and masks (imported only by a chat prepare: it needs transformers)."""
    from train.data.chat import ChatEncoder

    return ChatEncoder(spec)


ENCODERS = {"bytes": ByteEncoder, "tokenizer": TokenizerEncoder, "copy": CopyEncoder, "chat": chat_encoder}


def build_encoder(spec: EncoderSpec) -> Any:
    return ENCODERS[spec.kind](spec)


# ---------------------------------------------------------------------------- processes

_encoder: Any = None


def _start_process(spec: EncoderSpec, parent: int) -> None:
    # A forked process inherits its parent's Python handlers: one that only sets a flag (a trainer's, in a
    # process that trained before) would leave it deaf to the SIGTERM that ends the pool. It was born with
    # SIGTERM blocked (see encoded): one sent before this line waits, and then ends it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    end_with_parent(parent)  # a SIGKILLed prepare leaves no tokenizer process behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is prepare's to handle: it ends these processes
    serial_tokenizers()
    global _encoder
    _encoder = build_encoder(spec)


def _encode(unit: Unit) -> Any:
    return _encoder(unit)


def _context() -> Any:
    # fork: the processes start in milliseconds with what prepare imported (torch included); spawn elsewhere
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def encoded(units: Iterator[Unit], spec: EncoderSpec, procs: int) -> Iterator[tuple[Unit, Any]]:
    """Each unit with its ids (a chat unit's chat.RenderedUnit), in input order, encoded in `procs` processes
    (1: in this one)."""
    if procs == 1 or spec.kind == "copy":  # copying tokens is a memcpy: no process would help
        serial_tokenizers()
        encoder = build_encoder(spec)
        for unit in units:
            yield unit, encoder(unit)
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the forked processes
    try:
        pool = _context().Pool(procs, initializer=_start_process, initargs=(spec, os.getpid()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        pending: deque[tuple[Unit, Any]] = deque()
        for unit in units:
            pending.append((unit, pool.apply_async(_encode, (unit,))))
            if len(pending) >= WINDOW_PER_PROC * procs:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
