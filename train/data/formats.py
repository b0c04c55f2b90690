"""The input formats of `make prepare`, decided by content as well as by extension, read as a stream of units.

| format | what it is | documents |
|---|---|---|
| text | any other file (.txt, .md, code), optionally .gz/.zst | the whole file is one document |
| jsonl | JSON lines (.jsonl, .ndjson, .json), optionally .gz/.zst | each line's TEXT_FIELD |
| parquet | Parquet (magic PAR1), read with pyarrow | each row's TEXT_FIELD column |
| datasets | a directory from `datasets`' save_to_disk (state.json + Arrow files) | each row's TEXT_FIELD |
| llmc | llm.c token shards (magic 20240520, train/data/llmc.py) | already tokens: copied, never re-tokenized |

Content wins where it is unambiguous: gzip and zstd are recognised by their magic whatever the name
says, Parquet and llm.c shards by theirs, and a name that claims a format its bytes do not have is
refused. Between text and JSON lines, which share their bytes, the extension decides; a file with
neither kind of extension is JSON lines when its first line is a JSON object.

Files are opened by train/data/streams.py (regular files only, gzip and zstd in bounded memory).
Reading is a stream of Units, each about UNIT_BYTES of text, cut only where a rerun can start again
(train/data/shards.py keeps the cursor of each shard's first unit): the units from a cursor are a
function of the input and the cursor alone, so one process or many, and a resumed run, see the same.
A document longer than PIECE_BYTES is encoded in pieces cut after a newline (train/data/encode.py);
a text file streams in such pieces, so no file is ever read whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.data import llmc
from train.data.streams import COMPRESSIONS, HEAD_BYTES, READ_BLOCK, Compression, Stream, need, read_head, read_small
from train.errors import DataError

# A unit of work for one tokenizer process: about this much text (a whole record more at most).
UNIT_BYTES = 1 << 20
# Rows a Parquet or Arrow batch is read in: the reader holds one batch of the text column at a time.
BATCH_ROWS = 1024
# Tokens an llm.c shard is copied in.
UNIT_TOKENS = 1 << 20
# Pieces of long documents (train/data/encode.py): cut after the first newline at or past PIECE_BYTES,
# and at PIECE_LIMIT (on a character boundary) when a line runs on without one.
PIECE_BYTES = 1 << 20
PIECE_LIMIT = 4 << 20
# A JSON line longer than this is refused: a file without newlines is not JSON lines.
MAX_LINE = 64 << 20
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"
# A datasets directory's JSON files are small; a larger one is not what save_to_disk wrote.
DATASET_JSON_LIMIT = 16 << 20
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")

# (file offset in the decompressed stream or row or token index, records before it: lines or rows)
Position = tuple[int, int]


# Structured or compressed files no format here reads: each is refused by name rather than read as bytes.
UNREAD_MAGICS = (
    (b"BZh", "a bzip2 file: decompress it (bunzip2), or recompress with zstd or gzip"),
    (b"\xfd7zXZ\x00", "an xz file: decompress it (unxz), or recompress with zstd or gzip"),
    (b"PK\x03\x04", "a zip archive: unzip it and give the files inside"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive: extract it and give the files inside"),
    (b"ARROW1", "an Arrow file: give the datasets directory it belongs to"),
    (b"\xff\xff\xff\xff", "an Arrow stream (a datasets .arrow file): give the datasets directory it belongs to"),
    (b"\x93NUMPY", "a NumPy array: write it as a token file (docs/data.md#the-token-file-format)"),
)


@dataclass(frozen=True)
class Input:
    """One input of a prepare: a file or a datasets directory, and what it holds."""

    path: Path
    format: str  # a FORMATS key
    compression: str | None = None  # a COMPRESSIONS name
    files: tuple[Path, ...] = ()  # a datasets directory's Arrow files, in order
    size: int = 0  # bytes on disk

    def describe(self) -> str:
        wrapped = f" ({self.compression})" if self.compression else ""
        return f"{FORMATS[self.format].title}{wrapped}"


@dataclass
class Unit:
    """Consecutive records of one input, the work of one tokenizer call; `end` is where the next unit starts."""

    file: int
    origin: str  # the input's path, for messages
    format: str
    start: Position
    end: Position = (0, 0)
    records: list[Any] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)  # text pieces: whether each ends its document
    size: int = 0  # bytes (or tokens) of the records
    disk: int = 0  # bytes of the input on disk read when the unit was cut, for progress
    last: bool = False  # the input's last unit: the next one starts at the next input


@dataclass
class Meter:
    """Bytes on disk read so far from the input being read (a compressed file's compressed bytes)."""

    disk: int = 0


# ---------------------------------------------------------------------------- records of each format
# A reader yields (record, its end position, whether it ends a document) from a start position; a unit
# may end after any record, so a rerun can start at any record's end.


def _char_boundary(data: bytes | bytearray, index: int) -> int:
    """index moved back to the start of a UTF-8 character (past at most three continuation bytes)."""
    for _ in range(3):
        if index <= 0 or data[index] & 0xC0 != 0x80:
            break
        index -= 1
    return index


class PieceCutter:
    """Cuts a byte stream into pieces by the rule of the module docstring, however the bytes arrive."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        pieces = []
        while len(self.buffer) >= PIECE_BYTES:
            newline = self.buffer.find(b"\n", PIECE_BYTES - 1, PIECE_LIMIT)
            if newline >= 0:
                cut = newline + 1
            elif len(self.buffer) >= PIECE_LIMIT:
                cut = _char_boundary(self.buffer, PIECE_LIMIT)
            else:
                break  # the newline may still come
            pieces.append(bytes(self.buffer[:cut]))
            del self.buffer[:cut]
        return pieces

    def finish(self) -> bytes:
        rest, self.buffer = bytes(self.buffer), bytearray()
        return rest


def pieces_of(document: bytes) -> list[bytes]:
    """A whole document's pieces: the same cuts a text file of these bytes gets when it streams."""
    if len(document) < PIECE_BYTES:
        return [document]
    cutter = PieceCutter()
    return [*cutter.feed(document), cutter.finish()]


def _text_records(source: Input, start: Position, text_field: str, meter: Meter) -> Iterator[tuple]:
    stream = Stream(source.path, source.compression, start[0])
    offset, cutter = start[0], PieceCutter()
    try:
        while block := stream.read(READ_BLOCK):
            meter.disk = stream.disk()
            for piece in cutter.feed(block):
                offset += len(piece)
                yield piece, (offset, 0), False
        rest = cutter.finish()
        yield rest, (offset + len(rest), 0), True
    finally:
        stream.close()


def _jsonl_records(source: Input, start: Position, text_field: str, meter: Meter) -> Iterator[tuple]:
    stream = Stream(source.path, source.compression, start[0])
    offset, line = start
    try:
        while raw := stream.readline(MAX_LINE):
            line += 1
            if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
                raise DataError(
                    f"{source.path} line {line} is longer than {MAX_LINE >> 20} MiB; a JSON lines file has one "
                    "record per line"
                )
            offset += len(raw)
            meter.disk = stream.disk()
            yield raw, (offset, line), True
    finally:
        stream.close()


def _text_column(names: list[str], types: list[Any], source: Input, text_field: str) -> None:
    """Refuse a table without TEXT_FIELD, naming the columns it has, or whose column does not hold text."""
    pa = need("pyarrow", f"reading {source.path}")
    if text_field not in names:
        shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
        raise DataError(
            f"{source.path} has no column {text_field!r} (its columns: {shown}); set TEXT_FIELD to the one with the text"
        )
    kind = types[names.index(text_field)]
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(f"{source.path}: column {text_field!r} holds {kind}, not text; set TEXT_FIELD to a text column")


def _rows(values: list[Any], first_row: int, source: Input, text_field: str) -> Iterator[tuple]:
    for row, value in enumerate(values, start=first_row + 1):
        if value is None:
            raise DataError(f"{source.path} row {row}: {text_field!r} is null; fill or drop the rows without text")
        yield value, (row, row), True


def _parquet_records(source: Input, start: Position, text_field: str, meter: Meter) -> Iterator[tuple]:
    pq = need("pyarrow.parquet", f"reading {source.path}")
    try:
        table = pq.ParquetFile(source.path)
        schema = table.schema_arrow
        _text_column(schema.names, schema.types, source, text_field)
        total, first = table.metadata.num_rows, 0
        for group in range(table.metadata.num_row_groups):
            rows = table.metadata.row_group(group).num_rows
            if first + rows <= start[0]:
                first += rows
                continue
            for batch in table.iter_batches(BATCH_ROWS, row_groups=[group], columns=[text_field], use_threads=False):
                skip = max(0, start[0] - first)
                values = batch.column(0).to_pylist()[skip:]
                yield from _rows(values, first + skip, source, text_field)
                first += batch.num_rows
                meter.disk = source.size * first // max(total, 1)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError are these
        raise DataError(f"{source.path} is not a readable Parquet file ({_first_line(exc)}); fetch it again") from None


def _dataset_records(source: Input, start: Position, text_field: str, meter: Meter) -> Iterator[tuple]:
    pa = need("pyarrow", f"reading the datasets directory {source.path}")
    first, done = 0, 0
    for path in source.files:
        try:
            with pa.memory_map(str(path)) as mapped:
                reader = pa.ipc.open_stream(mapped)
                _text_column(reader.schema.names, reader.schema.types, source, text_field)
                for batch in reader:
                    if first + batch.num_rows > start[0]:
                        skip = max(0, start[0] - first)
                        values = batch.column(reader.schema.names.index(text_field)).to_pylist()[skip:]
                        yield from _rows(values, first + skip, source, text_field)
                    first += batch.num_rows
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable Arrow file ({_first_line(exc)}); save the dataset again") from None
        done += path.stat().st_size
        meter.disk = done


def _llmc_records(source: Input, start: Position, text_field: str, meter: Meter) -> Iterator[tuple]:
    tokens = llmc.open_shard(source.path)
    for begin in range(start[0], len(tokens), UNIT_TOKENS):
        chunk = np.array(tokens[begin : begin + UNIT_TOKENS])
        meter.disk = llmc.HEADER_BYTES + (begin + len(chunk)) * llmc.TOKEN_DTYPE.itemsize
        yield chunk, (begin + len(chunk), 0), True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


@dataclass(frozen=True)
class Format:
    name: str
    title: str  # as a message names it: "JSON lines"
    records: Callable[[Input, Position, str, Meter], Iterator[tuple]]
    tokens: bool = False  # already tokens (llm.c shards)


FORMATS = {
    f.name: f
    for f in (
        Format("text", "text", _text_records),
        Format("jsonl", "JSON lines", _jsonl_records),
        Format("parquet", "Parquet", _parquet_records),
        Format("datasets", "a datasets directory", _dataset_records),
        Format("llmc", "llm.c shards", _llmc_records, tokens=True),
    )
}


# ---------------------------------------------------------------------------- deciding the format


def _decompressed_head(path: Path, compression: Compression) -> bytes:
    stream = Stream(path, compression.name, 0)
    try:
        return stream.read(HEAD_BYTES)
    finally:
        stream.close()


def _is_json_object_line(head: bytes) -> bool:
    first = head.lstrip().split(b"\n", 1)[0]
    if not first.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _strip_compression(name: str) -> str:
    for compression in COMPRESSIONS:
        if name.endswith(compression.suffix):
            return name[: -len(compression.suffix)]
    return name


def _dataset_dir(path: Path) -> Input:
    """A `save_to_disk` directory: its Arrow files from state.json; a DatasetDict names its splits."""
    splits = _json_file(path / DATASET_DICT)
    if splits is not None:
        names = splits.get("splits") if isinstance(splits, dict) else None
        shown = ", ".join(str(n) for n in names) if isinstance(names, list) else "see dataset_dict.json"
        raise DataError(
            f"{path} holds several splits of a datasets DatasetDict ({shown}); give one split's directory, "
            f"e.g. INPUT={path / (names[0] if isinstance(names, list) and names else 'train')}"
        )
    state = _json_file(path / DATASET_STATE)
    if state is None:
        raise DataError(
            f"INPUT={path} is a directory but not a datasets save_to_disk directory (no {DATASET_STATE}); "
            f"give files or a glob, e.g. '{path}/**/*.jsonl'"
        )
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise DataError(f"{path / DATASET_STATE} lists no _data_files; save the dataset again") from None
    files = []
    for name in names:
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not (path / name).is_file():
            raise DataError(f"{path / DATASET_STATE} names {name!r}, which is not an Arrow file beside it")
        files.append(path / name)
    return Input(path, "datasets", None, tuple(files), sum(f.stat().st_size for f in files))


def _json_file(path: Path) -> Any:
    """A small JSON file of a datasets directory, or None when absent; DataError when it is there but unreadable."""
    if not path.exists() and not path.is_symlink():
        return None
    data = read_small(path, DATASET_JSON_LIMIT)
    try:
        return json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        raise DataError(f"{path} is not valid JSON; save the dataset again") from None


def detect(path: Path) -> Input:
    """What an input holds, from its bytes first and its name second (the module docstring's rules)."""
    if path.is_dir():
        return _dataset_dir(path)
    head = read_head(path)
    name = path.name.lower()
    size = path.stat().st_size
    compression = next((c for c in COMPRESSIONS if head.startswith(c.magic)), None)
    if compression is not None:
        head = _decompressed_head(path, compression)
        name = _strip_compression(name)
    for magic, what in UNREAD_MAGICS:
        if head.startswith(magic):
            raise DataError(f"{path} is {what}")
    claimed = "parquet" if name.endswith(".parquet") else None
    if head.startswith(b"PAR1"):
        if compression is not None:
            raise DataError(f"{path} is a {compression.name}-compressed Parquet file; decompress it first")
        return Input(path, "parquet", None, (), size)
    if claimed:
        raise DataError(f"{path} is named Parquet but its bytes are not (no PAR1 magic); fetch it again")
    if llmc.is_llmc(head):
        if compression is not None:
            raise DataError(f"{path} is a {compression.name}-compressed llm.c shard; decompress it first")
        return Input(path, "llmc", None, (), size)
    comp = compression.name if compression else None
    if name.endswith(TEXT_SUFFIXES):
        return Input(path, "text", comp, (), size)
    if name.endswith(JSONL_SUFFIXES) or _is_json_object_line(head):
        if name.endswith(".json") and not _is_json_object_line(head):
            kind = "one JSON array" if head.lstrip().startswith(b"[") else "one JSON document"
            raise DataError(
                f"{path} holds {kind}, not JSON lines (one object per line); convert it, e.g. "
                f"jq -c '.[]' {path} > {path.with_suffix('.jsonl')}"
            )
        return Input(path, "jsonl", comp, (), size)
    return Input(path, "text", comp, (), size)


def one_format(inputs: list[Input], what: str) -> str:
    """The format all inputs share; DataError naming the formats (with an example of each) when they mix."""
    by_format: dict[str, list[Input]] = {}
    for source in inputs:
        by_format.setdefault(source.format, []).append(source)
    if len(by_format) > 1:
        parts = [
            f"{len(group)} {FORMATS[name].title} ({group[0].path}{', …' if len(group) > 1 else ''})"
            for name, group in by_format.items()
        ]
        raise DataError(f"{what} mixes formats: {' and '.join(parts)}; give one format per prepare")
    return next(iter(by_format))


def refuse_unless_text(paths: list[Path]) -> None:
    """Where a file's bytes are read as text (data.path, DATA): one line for a structured or compressed one."""
    for path in paths:
        try:
            source = detect(path)
        except DataError:
            if os.access(path, os.R_OK):
                raise
            continue  # unreadable: the read that follows says so, in its caller's words
        if source.format == "text" and source.compression is None:
            continue
        output = f"data/{path.name.split('.')[0] or 'prepared'}.bin"
        raise DataError(
            f"{path} is {source.describe()}, not text; make a token file of it first: make prepare "
            f"INPUT='{path}' OUTPUT={output} (TOKENIZER=bpe), and give {output} instead"
        )


# ---------------------------------------------------------------------------- units


def units(inputs: list[Input], start: tuple[int, int, int], text_field: str, meter: Meter) -> Iterator[Unit]:
    """The units of the inputs from a cursor (input, offset, records before it), in order."""
    index, offset, ordinal = start
    for number in range(index, len(inputs)):
        source = inputs[number]
        begin: Position = (offset, ordinal) if number == index else (0, 0)
        meter.disk = 0
        unit = Unit(number, str(source.path), source.format, begin)
        for record, end, ends in FORMATS[source.format].records(source, begin, text_field, meter):
            # A full unit is cut when the next record comes: so the input's last unit is never empty
            # unless the input is, and a cursor never points past an input's last record.
            if unit.size >= UNIT_BYTES:
                ready, unit = unit, Unit(number, str(source.path), source.format, unit.end)
                yield ready
            unit.records.append(record)
            unit.ends.append(ends)
            unit.size += len(record)
            unit.end, unit.disk = end, meter.disk
        unit.last, unit.disk = True, source.size
        yield unit
