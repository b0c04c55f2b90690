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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from train.errors import DataError

END_OF_TEXT = "<|endoftext|>"
# The end-of-document tokens of common tokenizer.json files, tried in turn for a given tokenizer.
END_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
RUN_TOKENIZER_NAME = "tokenizer.json"
# tokenizers parallelises training and batch encoding; one thread keeps the merges' tie-breaking,
# and so the trained file, the same on every machine.
_SERIAL = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: Path | str) -> Any:
    """A tokenizers.Tokenizer from a tokenizer.json; DataError (one line) when the file is not one."""
    from tokenizers import Tokenizer  # optional at import: only runs with a tokenizer need it

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        return Tokenizer.from_str(text)
    except OSError as exc:
        raise DataError(f"cannot read the tokenizer {path} ({exc.strerror}); check the path") from None
    except (ValueError, Exception) as exc:  # tokenizers raises a plain Exception for a bad file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path} is not a tokenizer.json ({first}); give a Hugging Face tokenizer.json or TOKENIZER=bpe"
        ) from None


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
