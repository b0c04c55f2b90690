"""Tokenizers: bytes (no file), or a Hugging Face `tokenizers` tokenizer.json, trained here or given.

A trained tokenizer is a byte-level BPE (GPT-2's byte alphabet, no normalisation, no prefix
space), so every UTF-8 text encodes and decodes back byte for byte. Documents end with the
special token END_OF_TEXT, the BPE counterpart of the byte corpus's NUL separator.

Where it lives: `make prepare` writes NAME.tokenizer.json beside NAME.bin and records its sha256
and vocabulary size in NAME.json; a training run copies it to RUN_DIR/tokenizer.json (see
train/eval.py), where `make sample` and `make eval` find it. No tokenizer.json means bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.common.readfile import ReadRefused, open_bounded, parse_json, read_bounded
from train.errors import DataError

END_OF_TEXT = "<|endoftext|>"
# The end-of-document tokens of common tokenizer.json files, tried in turn for a given tokenizer.
END_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
RUN_TOKENIZER_NAME = "tokenizer.json"
# tokenizers parallelises training and batch encoding; one thread keeps the merges' tie-breaking,
# and so the trained file, the same on every machine.
_SERIAL = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# The largest tokenizer.json read: public ones are up to a few tens of MiB (large vocabularies).
TOKENIZER_LIMIT = 256 * 2**20
TOKENIZER_FIX = "give a Hugging Face tokenizer.json or TOKENIZER=bpe"
# A token file whose text tokens are more than this fraction unknown ([UNK]) lost that much of its
# text: the tokenizer does not fit it. A fitting tokenizer leaves next to nothing unknown.
MAX_UNKNOWN_FRACTION = 0.01


def sha256_of(path: Path | str) -> str:
    """The sha256 of a regular file (the bounded reader's open: a FIFO is a DataError, never a hang)."""
    try:
        handle, _ = open_bounded(path, TOKENIZER_LIMIT)
    except ReadRefused as exc:
        raise DataError(f"the tokenizer {path} {exc.reason}; give a tokenizer.json file") from None
    digest = hashlib.sha256()
    with handle as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tokenizer_bytes(path: Path | str, fix: str = TOKENIZER_FIX, *, follow: bool = True) -> bytes:
    """A tokenizer.json's bytes through the one bounded reader (follow False: a symlink is refused, for a copy)."""
    try:
        return read_bounded(path, TOKENIZER_LIMIT, follow=follow)
    except ReadRefused as exc:
        raise DataError(f"the tokenizer {path} {exc.reason}; {fix}") from None


def parse_tokenizer(data: bytes, where: Path | str, fix: str = TOKENIZER_FIX) -> Any:
    """A tokenizers.Tokenizer from a tokenizer.json's bytes; DataError (one line) when they are not one."""
    from tokenizers import Tokenizer  # optional at import: only runs with a tokenizer need it

    try:
        parse_json(data)  # UTF-8, JSON, and bounded depth, before the Rust parser sees it
        return Tokenizer.from_str(data.decode("utf-8"))
    except ReadRefused as exc:
        raise DataError(f"{where} {exc.reason}, not a tokenizer.json; {fix}") from None
    except Exception as exc:  # tokenizers raises a plain Exception for a bad file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where} is not a tokenizer.json ({first}); {fix}") from None


def load_tokenizer(path: Path | str, fix: str = TOKENIZER_FIX) -> Any:
    """A tokenizers.Tokenizer from a tokenizer.json file; DataError (one line) when the file is not one."""
    return parse_tokenizer(read_tokenizer_bytes(path, fix), path, fix)


@dataclass(frozen=True)
class TokenizerId:
    """What made a sequence of token ids: "bytes"; "tokenizer" (a tokenizer.json, by its sha256); "any"
    (synthetic ids, which stand for no text); or "unknown" (a token file that records nothing)."""

    kind: str
    sha256: str = ""

    def describe(self) -> str:
        if self.kind == "tokenizer":
            return f"the tokenizer with sha256 {self.sha256[:12]}"
        return {"bytes": "bytes (no tokenizer)", "any": "synthetic ids"}.get(self.kind, "an unrecorded tokenizer")

    def conflicts(self, other: TokenizerId) -> bool:
        """True when both are known and differ: ids of one mean other text under the other."""
        known = ("bytes", "tokenizer")
        return self.kind in known and other.kind in known and self != other


BYTES = TokenizerId("bytes")
ANY = TokenizerId("any")
UNKNOWN = TokenizerId("unknown")


def recorded_tokenizer(meta: dict[str, Any]) -> TokenizerId:
    """The identity a token file's sidecar records. Files written before it was recorded: a byte file
    (uint8, a vocabulary of at most 256) is bytes, any other is unknown."""
    record = meta.get("tokenizer")
    if isinstance(record, dict) and record.get("kind") == "bytes":
        return BYTES
    if isinstance(record, dict) and record.get("file", "") is None and isinstance(record.get("kind"), str):
        return TokenizerId(record["kind"])  # a built-in tokenizer without a file (llm.c's gpt2): not compared
    if isinstance(record, dict) and isinstance(record.get("sha256"), str) and record["sha256"]:
        return TokenizerId("tokenizer", record["sha256"])
    vocab = meta.get("vocab_size")
    if record is None and meta.get("dtype") == "uint8" and isinstance(vocab, int) and vocab <= 256:
        return BYTES
    return UNKNOWN


def tokenizer_id(path: Path | str | None) -> TokenizerId:
    """The identity of a tokenizer.json (its sha256), or bytes for None."""
    return BYTES if path is None else TokenizerId("tokenizer", sha256_of(path))


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id a tokenizer gives text it cannot encode ([UNK] and the like), or None when it has none."""
    model = (json.loads(tokenizer.to_str()).get("model") or {}) if tokenizer is not None else {}
    if isinstance(model.get("unk_id"), int):  # Unigram keeps the id itself
        return model["unk_id"]
    name = model.get("unk_token")
    return tokenizer.token_to_id(name) if isinstance(name, str) else None


class EncodingAudit:
    """Counts a token stream as it passes to the writer; at its end, refuses a tokenizer that cannot encode the
    text: no text token at all from non-empty text, or more than MAX_UNKNOWN_FRACTION of them unknown.

    Raising inside the stream stops the writer before it publishes anything (env.common.atomic).
    """

    def __init__(self, tokenizer: Any, separator: int | None, what: str) -> None:
        self.unknown = unknown_token_id(tokenizer)
        self.separator = separator
        self.what = what
        self.text_tokens = 0
        self.unknown_tokens = 0

    def count(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        separators = int(np.count_nonzero(ids == self.separator)) if self.separator is not None else 0
        self.text_tokens += ids.size - separators
        if self.unknown is not None:
            self.unknown_tokens += int(np.count_nonzero(ids == self.unknown))

    def check(self, text_bytes: int) -> None:
        if text_bytes and not self.text_tokens:
            raise DataError(
                f"{self.what} encodes {text_bytes:,} bytes of text into 0 tokens: it cannot encode this text; "
                "give a tokenizer made for it, or TOKENIZER=bpe to train one"
            )
        if self.text_tokens and self.unknown_tokens > MAX_UNKNOWN_FRACTION * self.text_tokens:
            raise DataError(
                f"{self.what} turns {self.unknown_tokens / self.text_tokens:.1%} of the text's "
                f"{self.text_tokens:,} tokens into its unknown token (more than {MAX_UNKNOWN_FRACTION:.0%}): it "
                "does not fit this text; give a tokenizer made for it, or TOKENIZER=bpe to train one"
            )

    def stream(self, chunks: Iterable[np.ndarray], text_bytes: Any) -> Iterator[np.ndarray]:
        """`chunks`, counted; checked after the last one (text_bytes(): the bytes of text read by then)."""
        for chunk in chunks:
            self.count(chunk)
            yield chunk
        self.check(text_bytes())


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Any:
    """A byte-level BPE of vocab_size tokens (256 bytes + END_OF_TEXT + merges) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # optional at import, as above

    minimum = 256 + 1
    if vocab_size < minimum + 1:
        raise DataError(f"VOCAB={vocab_size} leaves no room for merges; a byte-level BPE needs more than {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    saved = {key: os.environ.get(key) for key in _SERIAL}
    os.environ.update(_SERIAL)
    try:
        tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return tokenizer


def end_of_text_id(tokenizer: Any) -> int | None:
    """The id that ends a document (END_TOKENS, first found), or None: documents then simply run on."""
    for token in END_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    return None


def token_byte_lengths(tokenizer: Any) -> list[int] | None:
    """Bytes of text behind each token id (0 for special tokens), for bits per byte; None unless byte-level.

    In a byte-level tokenizer each character of a token's string stands for one byte.
    """
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    lengths = []
    for index in range(tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(index)
        lengths.append(0 if token is None or token in special else len(token))
    return lengths
