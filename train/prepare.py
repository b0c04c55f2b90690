"""Turn a corpus into token shards for data.source=files (`make prepare`): parallel, streaming, resumable.

    python -m train.prepare --input 'corpus/*.jsonl.zst' --output data/x.bin [--tokenizer bytes|bpe|PATH]
        [--vocab 8192] [--text-field text] [--procs N] [--shard-tokens N] [--shard-format tokens|llmc] [--force]
        [--chat] [--seq-len T] [--chat-template FILE.jinja]

Inputs (train/data/formats.py): text files, JSON lines (.jsonl, .gz, .zst), Parquet, a datasets
save_to_disk directory, or llm.c shards; one format per prepare, decided by content and name;
--text-field names the field or column. --tokenizer bytes (the default): each document's UTF-8
bytes are its tokens, then a NUL. bpe: trains a byte-level BPE of --vocab tokens on the input
(deterministic) and writes data/x.tokenizer.json. PATH: an existing tokenizer.json, or a Hugging
Face directory holding one (parsed, then copied there). llm.c shards are already GPT-2 tokens: they
are checked and copied (give their tokenizer.json as --tokenizer to record it).

Chat data (train/data/chat.py; --chat, or JSON lines whose records are conversations): each one is
rendered through the chat template of TOKENIZER (a model directory) or --chat-template, with a mask
of the assistant's tokens written beside the ids, and packed whole into the windows of --seq-len
(the data.seq_len it will train with); the report counts what was kept, truncated and dropped.

The ids are written as shards of --shard-tokens (train/data/shards.py; one shard is data/x.bin
itself) with data/x.json as the set's sidecar and manifest (train/data/tokens.py). --procs processes
(default: every core this process may use) encode about 1 MiB units in input order, so the output
is the same for any count. Resident memory is bounded by the units in flight, not by the input
(docs/data.md gives the figure). An interrupted prepare keeps its finished shards: the same
command again checks them and goes on from there. Only one prepare writes an OUTPUT at a time, and
files it did not write are never replaced without --force. Train with
ARGS="data.path=data/x.bin model.vocab_size=auto".
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from env.common.atomic import replace_atomically
from env.common.cli import ArgumentParser, count_arg, run_cli
from train.data import chat, formats, llmc
from train.data.encode import EncoderSpec, encoded, serial_tokenizers
from train.data.formats import FORMATS, Input, Meter, detect, one_format, units
from train.data.shards import (
    WRITER,
    OutputLock,
    Resume,
    SetPaths,
    ShardWriter,
    check_overwrite,
    kept_shards,
    own_manifest,
    write_manifest,
)
from train.data.streams import read_small
from train.data.text import glob_paths
from train.data.tokens import BYTES_TOKENIZER, GPT2_TOKENIZER, sidecar_path, token_dtype
from train.errors import DataError
from train.tokenizer import end_of_text_id, train_bpe

PROGRESS_EVERY_S = 2.0
# llm.c's and modded-nanogpt's shard size: 100M ids, 200 MB of uint16.
DEFAULT_SHARD_TOKENS = 100_000_000
SHARD_FORMATS = ("tokens", "llmc")
# A tokenizer.json larger than this is not one (the largest public ones are tens of MB).
TOKENIZER_LIMIT = 256 << 20
# A tokenizer that maps more than this share of the ids to its unknown token cannot encode the text.
UNKNOWN_SHARE = 0.01
# The longest chat window: model.max_seq_len's bound (train/models/deepseek.py MAX_SEQ_LEN, 1M tokens).
MAX_CHAT_SEQ_LEN = 1 << 20
# Only the test suite sets it: a pause after each unit, so that a SIGKILL lands in the middle of a prepare.
TEST_UNIT_SLEEP = "TORCHRIG_TEST_UNIT_SLEEP"
# What the units' cut points depend on: a rerun under other values starts afresh instead of resuming.
LAYOUT = {
    "unit_bytes": formats.UNIT_BYTES,
    "unit_tokens": formats.UNIT_TOKENS,
    "piece_bytes": formats.PIECE_BYTES,
    "piece_limit": formats.PIECE_LIMIT,
}


def available_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a job's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Progress:
    """Input bytes read out of a known total, with throughput, tokens/s and an ETA, every few seconds on stderr."""

    def __init__(self, what: str, total: int, out: TextIO = sys.stderr, done: int = 0) -> None:
        self.what, self.total, self.out = what, total, out
        self.done, self.start_done = done, done
        self.tokens = 0
        self.started = self.last = time.monotonic()

    def add(self, count: int, tokens: int = 0) -> None:
        self.done += count
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate else 0.0
        tokens = f", {self.tokens / elapsed:,.0f} tokens/s" if self.tokens else ""
        self.out.write(
            f"prepare: {self.what} {self.done / 2**20:,.1f} of {self.total / 2**20:,.1f} MiB "
            f"({self.done / max(self.total, 1):.0%}), {rate / 2**20:,.1f} MiB/s, eta {max(eta, 0):.0f} s{tokens}\n"
        )
        self.out.flush()


# ---------------------------------------------------------------------------- inputs and the plan


def expand_inputs(patterns: list[str], paths: SetPaths) -> list[Input]:
    """Files and datasets directories the globs match, without prepare's own outputs, each with its format."""
    shown = " ".join(repr(p) for p in patterns)
    matched = glob_paths(patterns)
    if not matched:
        raise DataError(f"INPUT={shown} matches no files; check the path and quote globs")
    marks = (formats.DATASET_STATE, formats.DATASET_DICT)
    datasets = {p for p in matched if p.is_dir() and any((p / mark).exists() for mark in marks)}
    for named in (Path(p) for p in patterns):
        if named.is_dir() and named not in datasets:
            detect(named)  # one line saying what this directory is not
    own = {p.resolve() for p in (paths.manifest, paths.tokenizer, *paths.existing_shards())}
    files = {p for p in matched if p.is_file() and p.parent not in datasets and p.resolve() not in own}
    if not files and not datasets:
        raise DataError(
            f"INPUT={shown} matches no input files (only folders, special files or this prepare's own outputs); "
            "give the input files"
        )
    sources = [detect(path) for path in sorted(files | datasets)]
    if not any(source.size for source in sources):
        raise DataError(f"INPUT={shown} matches only empty files ({len(sources)}); give files that hold text")
    return sources


def _fingerprint(source: Input) -> list[Any]:
    files = source.files or (source.path,)
    return [str(source.path), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


@dataclass
class Choice:
    """The tokenizer a prepare uses: its record for the sidecar, how to encode, and the file to write."""

    record: dict[str, Any]
    spec: EncoderSpec
    content: bytes | None = None  # the tokenizer.json to write beside OUTPUT
    unknown_id: int | None = None


def plan_of(
    inputs: list[Input], fmt: str, args: PrepareArgs, given: bytes | None, template: chat.ChatTemplate | None = None
) -> dict[str, Any]:
    """What decides the output: a rerun with the same plan resumes, any other starts afresh."""
    plan = {
        "inputs": [_fingerprint(source) for source in inputs],
        "format": fmt,
        "text_field": args.text_field,
        "tokenizer": args.tokenizer or "",
        "vocab": args.vocab if args.tokenizer == "bpe" else None,
        "tokenizer_sha256": hashlib.sha256(given).hexdigest() if given is not None else None,
        "shard_tokens": args.shard_tokens,
        "shard_format": args.shard_format,
        "layout": LAYOUT,
    }
    if template is not None:
        plan["chat"] = {"seq_len": args.seq_len, "template_sha256": template.sha256,
                        "specials": dict(template.specials), "alone": args.alone}  # fmt: skip
    return plan


def never_wider(copy: Path, source: Path | None) -> None:
    """A copy is readable by no one its source was not (a 0600 tokenizer stays 0600 beside the token set)."""
    try:
        mode = os.stat(source).st_mode & 0o777 if source is not None else None
        if mode is not None:
            os.chmod(copy, os.stat(copy).st_mode & mode & 0o777)
    except OSError:
        pass  # a source gone since it was read: the copy keeps the umask's mode


@dataclass
class PrepareArgs:
    inputs: list[str]
    output: str
    tokenizer: str | None = None  # bytes, bpe or a path; None: bytes (llm.c shards: their GPT-2 ids)
    vocab: int = 8192
    force: bool = False
    text_field: str = "text"
    procs: int = 1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    shard_format: str = "tokens"
    chat: bool = False  # CHAT=1: the records are conversations (else found from the first one)
    seq_len: int | None = None  # SEQ_LEN: the windows chat data is packed into
    chat_template: str | None = None  # CHAT_TEMPLATE: a .jinja file instead of TOKENIZER's template
    alone: bool = False  # ALONE=1: each conversation in a window of its own (chat.Packer)


def _read_given(path: str) -> bytes:
    given = chat.tokenizer_file(path)
    if not given.exists():
        raise DataError(
            f"TOKENIZER={path!r} is neither bytes, bpe, an existing tokenizer.json nor a directory holding one"
        )
    content = read_small(given, TOKENIZER_LIMIT)
    if content is None:
        raise DataError(f"TOKENIZER={str(given)!r} is not a regular file of at most {TOKENIZER_LIMIT >> 20} MiB")
    return content


def chat_template_of(args: PrepareArgs, fmt: str, sources: list[Input]) -> chat.ChatTemplate | None:
    """The chat template of a chat prepare (CHAT=1, or conversations found), None for text; DataError for
    settings chat data cannot use."""
    if not (args.chat or (fmt == "jsonl" and chat.looks_like_chat(sources[0], args.text_field))):
        if args.seq_len is not None or args.chat_template or args.alone:
            given = "SEQ_LEN" if args.seq_len is not None else "CHAT_TEMPLATE" if args.chat_template else "ALONE"
            raise DataError(
                f"{given} is for chat data, and INPUT holds {FORMATS[fmt].title} text records; leave it out, or give "
                'JSON lines of {"messages": [...]} (CHAT=1)'
            )
        return None
    if fmt != "jsonl":
        raise DataError(f"CHAT=1 reads JSON lines of conversations, and INPUT is {FORMATS[fmt].title}; convert it")
    if args.tokenizer in (None, "bytes", "bpe"):
        raise DataError(
            "INPUT holds conversations, rendered through the model's chat template: give TOKENIZER=<the model's "
            "directory> (or its tokenizer.json and CHAT_TEMPLATE=<a .jinja file>)"
        )
    if args.shard_format != "tokens":
        raise DataError("chat data keeps a mask beside its ids, which llm.c shards cannot: use SHARD_FORMAT=tokens")
    if args.seq_len is not None and args.seq_len < 1:
        raise DataError(f"SEQ_LEN={args.seq_len} holds no token; give the data.seq_len you will train with, e.g. 2048")
    if args.seq_len is not None and args.seq_len > MAX_CHAT_SEQ_LEN:
        raise DataError(
            f"SEQ_LEN={args.seq_len:,} is more than any model here reads ({MAX_CHAT_SEQ_LEN:,}); give the data.seq_len "
            "you will train with, e.g. 2048"
        )
    if args.seq_len is None:
        raise DataError(
            "chat data is packed whole into the training windows: give SEQ_LEN=<the data.seq_len you will train "
            "with>, e.g. SEQ_LEN=2048"
        )
    return chat.find_template(args.tokenizer, args.chat_template)


def _parse(content: bytes, where: str) -> Any:
    """The tokenizer in a tokenizer.json's bytes, parsed before anything is copied; DataError when it is not one."""
    from tokenizers import Tokenizer

    try:
        text = content.decode("utf-8")
        json.loads(text)
        return Tokenizer.from_str(text)
    except (ValueError, RecursionError, Exception) as exc:  # tokenizers raises a plain Exception for a bad file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{where} is not a tokenizer.json ({first}); give a Hugging Face tokenizer.json or TOKENIZER=bpe"
        ) from None


def _unknown_id(tokenizer: Any) -> int | None:
    model = json.loads(tokenizer.to_str()).get("model") or {}
    unknown = model.get("unk_token")
    return tokenizer.token_to_id(unknown) if isinstance(unknown, str) else None


def _tokenizer_choice(
    tokenizer: Any, kind: str, content: bytes, args: PrepareArgs, final: Path, template: chat.ChatTemplate | None = None
) -> Choice:
    vocab = tokenizer.get_vocab_size()
    end = end_of_text_id(tokenizer) if template is None else _conversation_end(tokenizer, template)
    dtype = "uint16" if args.shard_format == "llmc" else token_dtype(vocab)
    record = {"kind": kind, "file": final.name, "sha256": hashlib.sha256(content).hexdigest(),
              "vocab_size": vocab, "end_of_document": end}  # fmt: skip
    encoder = "tokenizer" if template is None else "chat"
    spec = EncoderSpec(encoder, args.text_field, dtype, tokenizer.to_str(), end, template)
    return Choice(record, spec, content, _unknown_id(tokenizer))


def _conversation_end(tokenizer: Any, template: chat.ChatTemplate) -> int:
    """What ends a conversation: the template's eos_token, else the tokenizer's end-of-text token."""
    eos = dict(template.specials).get("eos_token")
    found = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    found = found if found is not None else end_of_text_id(tokenizer)
    if found is None:
        raise DataError(
            "the tokenizer has no eos_token nor end-of-text token to end each conversation with; give "
            "TOKENIZER=<the model's directory>, whose tokenizer_config.json names its eos_token"
        )
    return found


def choose_tokenizer(
    args: PrepareArgs,
    fmt: str,
    inputs: list[Input],
    paths: SetPaths,
    given: bytes | None,
    old: dict[str, Any] | None,
    out: TextIO,
    template: chat.ChatTemplate | None = None,
) -> Choice:
    """Bytes, a trained BPE (reused from an interrupted run of the same plan), a given file, or llm.c's GPT-2."""
    kind = args.tokenizer or ("gpt2" if fmt == "llmc" else "bytes")
    if FORMATS[fmt].tokens and kind in ("bytes", "bpe"):
        raise DataError(
            f"INPUT is {FORMATS[fmt].title}, already tokens: leave TOKENIZER out, or give the tokenizer.json "
            "they were made with (it is recorded, never used to re-tokenize)"
        )
    if kind == "bytes":
        return Choice(BYTES_TOKENIZER, EncoderSpec("bytes", args.text_field, "uint8"))
    if kind == "gpt2":
        return Choice(GPT2_TOKENIZER, EncoderSpec("copy", args.text_field, "uint16"))
    if kind == "bpe":
        reused = _reusable_bpe(paths, old)
        if reused is not None:
            return _tokenizer_choice(_parse(reused, str(paths.tokenizer)), "bpe", reused, args, paths.tokenizer)
        total = sum(source.size for source in inputs)
        texts = _texts(inputs, args.text_field, Progress("BPE training read", total, out))
        trained = train_bpe(texts, args.vocab)
        content = trained.to_str(pretty=True).encode()
        return _tokenizer_choice(trained, "bpe", content, args, paths.tokenizer)
    assert given is not None
    parsed = _parse(given, kind)
    if template is not None:
        chat.check_template(template, parsed.to_str(), parsed)
    choice = _tokenizer_choice(parsed, "file", given, args, paths.tokenizer, template)
    if FORMATS[fmt].tokens:
        return Choice(choice.record, EncoderSpec("copy", args.text_field, "uint16"), given)
    return choice


def _reusable_bpe(paths: SetPaths, old: dict[str, Any] | None) -> bytes | None:
    """The BPE an interrupted prepare of the same plan trained, when it lies beside OUTPUT unchanged."""
    recorded = (old or {}).get("tokenizer") or {}
    if recorded.get("kind") != "bpe" or paths.tokenizer.is_symlink():
        return None
    content = read_small(paths.tokenizer, TOKENIZER_LIMIT)
    if content is None or hashlib.sha256(content).hexdigest() != recorded.get("sha256"):
        return None
    return content


def _texts(inputs: list[Input], text_field: str, progress: Progress) -> Iterator[str]:
    from train.data.encode import documents

    meter = Meter()
    read = 0
    for unit in units(inputs, (0, 0, 0), text_field, meter):
        for piece, _ in documents(unit, text_field, as_text=True):
            yield piece  # type: ignore[misc]
        done = sum(s.size for s in inputs[: unit.file]) + unit.disk
        progress.add(done - read)
        read = done


# ---------------------------------------------------------------------------- prepare


def _resume_point(same: dict[str, Any] | None, paths: SetPaths) -> Resume:
    """The shards of an earlier run of the same plan that are whole, and where to go on; nothing otherwise."""
    if same is None or not isinstance(same.get("shards"), list):
        return kept_shards(paths, None)
    try:
        return kept_shards(paths, same)
    except (KeyError, TypeError, ValueError):  # a manifest of another version: start afresh
        return kept_shards(paths, None)


def _tokenizer_in_place(paths: SetPaths, manifest: dict[str, Any]) -> bool:
    record = manifest.get("tokenizer") or {}
    if not record.get("file"):
        return True
    content = read_small(paths.tokenizer, TOKENIZER_LIMIT) if not paths.tokenizer.is_symlink() else None
    return content is not None and hashlib.sha256(content).hexdigest() == record.get("sha256")


def _check_vocab(args: PrepareArgs, choice: Choice) -> None:
    vocab = choice.record["vocab_size"]
    if args.shard_format == "llmc" and vocab > 2**16:
        raise DataError(f"SHARD_FORMAT=llmc stores uint16 ids; this tokenizer has {vocab:,}: use SHARD_FORMAT=tokens")


def prepare(
    inputs: list[str],
    output: str,
    tokenizer: str | None = None,
    vocab: int = 8192,
    force: bool = False,
    *,
    text_field: str = "text",
    procs: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    shard_format: str = "tokens",
    chat: bool = False,
    seq_len: int | None = None,
    chat_template: str | None = None,
    alone: bool = False,
    out: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Prepare OUTPUT from the inputs (the module docstring); returns the finished set's manifest."""
    args = PrepareArgs(inputs, output, tokenizer, vocab, force, text_field, procs, shard_tokens, shard_format, chat,
                       seq_len, chat_template, alone)  # fmt: skip
    if not output.endswith(".bin") or output.endswith("/.bin") or output == ".bin":
        raise DataError(f"OUTPUT={output!r} must end in NAME.bin, e.g. data/mycorpus.bin")
    paths = SetPaths(Path(output))
    paths.folder.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(paths)
    try:
        for leftover in paths.remove_leftovers():
            out.write(f"prepare: removed {leftover.name}, left by an interrupted prepare\n")
        return _prepare_locked(args, paths, out)
    finally:
        lock.release()


def _prepare_locked(args: PrepareArgs, paths: SetPaths, out: TextIO) -> dict[str, Any]:
    sources = expand_inputs(args.inputs, paths)
    fmt = one_format(sources, "INPUT")
    template = chat_template_of(args, fmt, sources)
    old = own_manifest(paths)
    check_overwrite(paths, old, args.force, out, str(chat.tokenizer_file(args.tokenizer)) if args.tokenizer else None)
    given = _read_given(args.tokenizer) if args.tokenizer not in (None, "bytes", "bpe") else None
    plan = plan_of(sources, fmt, args, given, template)
    same = old if old is not None and old.get("plan") == plan else None
    resume = _resume_point(same, paths)
    whole = same is not None and same.get("complete") and len(resume.shards) == len(same["shards"])
    if whole and _tokenizer_in_place(paths, same):
        out.write(f"prepare: {paths.output} is already prepared from these inputs (its shards check out)\n")
        return same
    choice = choose_tokenizer(args, fmt, sources, paths, given, same, out, template)
    _check_vocab(args, choice)
    vocab_size = choice.record["vocab_size"]
    dtype = "uint16" if args.shard_format == "llmc" else choice.spec.dtype  # llm.c's shards hold uint16
    manifest = {
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokenizer": choice.record,
        "written_by": WRITER,
        "format": fmt,
        "files": len(sources),
        "bytes": sum(source.size for source in sources),
        "text_field": args.text_field if not FORMATS[fmt].tokens else None,
        "shard_tokens": args.shard_tokens,
        "shard_format": args.shard_format,
        "plan": plan,
    }
    if template is not None:
        manifest["chat"] = {"seq_len": args.seq_len, "learned": chat.LEARNED_ROLE, "alone": args.alone,
                            **template.record()}  # fmt: skip
    writer = ShardWriter(paths, manifest, resume, args.shard_tokens, vocab_size)

    def begin() -> None:
        """The first unit encoded: from here on OUTPUT is this prepare's. The manifest goes first, then the
        tokenizer file, so whatever a kill leaves, the rerun knows both as its own."""
        write_manifest(paths, writer.snapshot(complete=False))
        copy = choice.content is not None and choice.record.get("file")
        if copy and not (args.tokenizer and chat.tokenizer_file(args.tokenizer).resolve() == paths.tokenizer.resolve()):
            replace_atomically(paths.tokenizer, lambda handle: handle.write(choice.content), "wb")
            never_wider(paths.tokenizer, chat.tokenizer_file(args.tokenizer) if args.tokenizer else None)

    try:
        _encode_into(writer, sources, choice, args, resume, out, begin)
    except BaseException:
        writer.abandon()
        raise
    if writer.total == 0:
        writer.abandon()
        if template is not None:
            raise DataError(
                f"INPUT={' '.join(args.inputs)!r} holds no conversation to learn from ({chat.report(writer.tally)}); "
                "give conversations with assistant turns, or a larger SEQ_LEN"
            )
        text = sum(source.size for source in sources)
        if args.tokenizer not in (None, "bytes") and text:
            raise DataError(
                f"TOKENIZER={args.tokenizer} encodes {text:,} bytes of text into 0 tokens: it cannot encode this "
                "text; use TOKENIZER=bpe or a tokenizer made for such text"
            )
        raise DataError(f"INPUT={' '.join(args.inputs)!r} holds no documents; give files with text")
    return writer.finish()


def _encode_into(
    writer: ShardWriter,
    sources: list[Input],
    choice: Choice,
    args: PrepareArgs,
    resume: Resume,
    out: TextIO,
    begin: Callable[[], None],
) -> None:
    """Every unit from the resume point, encoded in input order into the writer; `begin` before the first."""
    start_file, offset, ordinal, skip = resume.cursor
    meter = Meter()
    before = sum(source.size for source in sources[:start_file])
    progress = Progress("tokenized", sum(source.size for source in sources), out, done=before)
    seen, unknown, written, begun = before, 0, 0, False
    pause = float(os.environ.get(TEST_UNIT_SLEEP, "0") or 0)
    stream = units(sources, (start_file, offset, ordinal), args.text_field, meter)
    packer = chat.Packer(args.seq_len, choice.spec.end_of_document, args.alone) if choice.spec.kind == "chat" else None
    for number, (unit, result) in enumerate(encoded(stream, choice.spec, args.procs)):
        mask, tally = None, None
        if packer is not None:  # a unit's conversations, placed from where the stream stands
            last = unit.last and unit.file == len(sources) - 1
            tokens, mask, tally = packer.pack(result, writer.total - skip, last)
        else:
            tokens = result
        if choice.unknown_id is not None:
            unknown += int(np.count_nonzero(tokens == choice.unknown_id))
            if number == 0:
                _check_unknown(unknown, len(tokens))
        if number == 0:
            begin()
            begun = True
        writer.add(unit, tokens, skip, mask, tally)
        skip, written = 0, written + len(tokens)
        done = sum(source.size for source in sources[: unit.file]) + unit.disk
        progress.add(done - seen, len(tokens))
        seen = done
        time.sleep(pause)
    if not begun:  # nothing left to read: the set is finished but for its manifest (or tokenizer file)
        begin()
    if choice.unknown_id is not None:
        _check_unknown(unknown, written)


def _check_unknown(unknown: int, total: int) -> None:
    """Refuse a tokenizer that cannot encode the text (checked after the first unit, and over the whole input)."""
    if total and unknown > UNKNOWN_SHARE * total:
        raise DataError(
            f"the tokenizer turns {unknown / total:.1%} of the text's {total:,} tokens into its unknown token: it "
            "cannot encode this text; "
            "use TOKENIZER=bpe or a tokenizer made for such text"
        )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", action="extend", required=True, metavar="GLOB",
        help="files, globs (** recurses) or datasets directories; quote globs, repeat or list several",
    )  # fmt: skip
    parser.add_argument("--output", required=True, metavar="PATH.bin", help="the token set to write (its .json beside)")
    parser.add_argument("--tokenizer", default=None, help="bytes (default), bpe (train one), or a tokenizer.json")
    parser.add_argument("--vocab", type=count_arg("VOCAB"), help="vocabulary size of a trained BPE (8192)")
    parser.add_argument("--text-field", default="text", help="the JSON field or column holding the text (TEXT_FIELD)")
    parser.add_argument("--procs", type=count_arg("PROCS"), default=None, help="tokenizer processes (default: cores)")
    parser.add_argument(
        "--shard-tokens", type=count_arg("SHARD_TOKENS"), default=DEFAULT_SHARD_TOKENS, help="ids per shard"
    )
    parser.add_argument("--shard-format", default="tokens", help="tokens (raw ids) or llmc (llm.c shards)")
    parser.add_argument("--force", action="store_true", help="replace files that prepare did not write (FORCE=1)")
    parser.add_argument("--chat", action="store_true", help="the records are conversations (CHAT=1; else found)")
    parser.add_argument("--seq-len", type=count_arg("SEQ_LEN"), default=None, help="chat: the windows to pack into")
    parser.add_argument("--chat-template", default=None, help="chat: a .jinja template instead of TOKENIZER's")
    parser.add_argument("--alone", action="store_true", help="chat: each conversation in a window of its own (ALONE=1)")
    args = parser.parse_args(argv)
    if args.vocab is not None and args.tokenizer != "bpe":
        raise DataError(
            f"VOCAB={args.vocab} sets the size of a BPE that prepare trains, so it needs TOKENIZER=bpe; "
            f"TOKENIZER={args.tokenizer or 'bytes'} has its own vocabulary: drop VOCAB or set TOKENIZER=bpe"
        )
    args.vocab = 8192 if args.vocab is None else args.vocab
    cores = available_cores()
    procs = cores if args.procs is None else args.procs
    if not 1 <= procs <= cores:
        raise DataError(f"PROCS={procs} must be from 1 to the {cores} cores this process may use")
    if args.vocab > 2**32:
        raise DataError(f"VOCAB={args.vocab} does not fit a uint32 token file; use at most {2**32}")
    if args.shard_tokens < 1 or (args.shard_format == "llmc" and args.shard_tokens > llmc.MAX_TOKENS):
        raise DataError(f"SHARD_TOKENS={args.shard_tokens} must be from 1 to {llmc.MAX_TOKENS:,}")
    if args.shard_format not in SHARD_FORMATS:
        raise DataError(f"SHARD_FORMAT={args.shard_format!r} is not one of {', '.join(SHARD_FORMATS)}")
    if not args.text_field or any(ord(c) < 32 for c in args.text_field):
        raise DataError(f"TEXT_FIELD={args.text_field!r} must name a field, e.g. TEXT_FIELD=text")
    try:
        info = prepare(
            args.input, args.output, args.tokenizer, args.vocab, args.force, text_field=args.text_field,
            procs=procs, shard_tokens=args.shard_tokens, shard_format=args.shard_format, chat=args.chat,
            seq_len=args.seq_len, chat_template=args.chat_template, alone=args.alone,
        )  # fmt: skip
    except OSError as exc:
        raise DataError(f"cannot write {args.output} ({exc.strerror}); choose a writable OUTPUT") from None
    tokenizer = info["tokenizer"]
    extra = f", tokenizer {tokenizer['file']} (vocab {tokenizer['vocab_size']:,})" if tokenizer.get("file") else ""
    shards = len(info["shards"])
    settings = f"data.path={args.output} model.vocab_size=auto"
    if "chat" in info:
        print(f"prepare: chat: {chat.report(info.get('tally') or {})}; windows of {info['chat']['seq_len']} tokens")
        settings += f" data.seq_len={info['chat']['seq_len']}"
    print(
        f"wrote {args.output} and {sidecar_path(Path(args.output))}: {info['count']:,} {info['dtype']} tokens in "
        f"{shards} shard{'s' if shards != 1 else ''} from {info['files']} {FORMATS[info['format']].title} "
        f"input{'s' if info['files'] != 1 else ''}{extra}; train with make train " + shlex.quote(f"ARGS={settings}")
    )
    return 0


def encode_files(files: list[Path], tokenizer: Any) -> Iterator[np.ndarray]:
    """Text files through a tokenizer, each document ended by its end-of-text id, exactly as prepare writes them."""
    sources = [detect(Path(p)) for p in files]
    formats.refuse_unless_text([s.path for s in sources])
    serial_tokenizers()
    end = end_of_text_id(tokenizer)
    spec = EncoderSpec("tokenizer", "text", "uint32" if tokenizer.get_vocab_size() > 2**16 else "uint16",
                       tokenizer.to_str(), end)  # fmt: skip
    for _, tokens in encoded(units(sources, (0, 0, 0), "text", Meter()), spec, 1):
        yield tokens


if __name__ == "__main__":
    run_cli("prepare", main)
