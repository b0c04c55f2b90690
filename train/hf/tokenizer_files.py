"""The tokenizer files of a Hugging Face model directory: what AutoTokenizer and generate need.

- tokenizer.json: the run's own (a BPE, trained or given), or for byte-level runs a byte tokenizer in
  `tokenizers`' own terms (`byte_tokenizer`): a BPE over GPT-2's byte alphabet without merges, so id b is
  byte b for all 256 and every UTF-8 text encodes to its bytes; its post-processor puts the document
  separator (id 0, NUL) first, as `make sample` starts a byte-level context.
- tokenizer_config.json with "tokenizer_class": "PreTrainedTokenizerFast" (without it transformers 4.x reads a
  DeepSeek or Llama directory's tokenizer as LlamaTokenizerFast and adds three tokens), the special tokens and
  model_max_length; special_tokens_map.json; generation_config.json with their ids.
- Special tokens: the document separator is the end of text (eos), and bos and pad too: for bytes id 0,
  whose string in the byte alphabet is "Ā" (U+0100), for a BPE its END_TOKENS entry. A special token is
  a string of the vocabulary; one that is not would be added by transformers as a new id past the model's.
  The price of a byte vocabulary with no spare id: the literal text "Ā" typed into AutoTokenizer encodes to
  id 0 rather than its two UTF-8 bytes (docs/sampling-export.md).

A directory from elsewhere (a transformers checkpoint) keeps its own files: they are parsed and checked (every
special token in the vocabulary), then written again unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.hf.files import MAX_TOKENIZER_BYTES, WeightsError, is_regular, read_json, read_regular
from train.tokenizer import END_TOKENS

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
ID_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "pad_token_id"}
BYTES = 256
DOC_SEPARATOR = 0  # the byte corpus ends every document with NUL (train/data)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table (tokenizers' ByteLevel): printable bytes stand for themselves, the other
    68 for chr(256 + k) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(BYTES):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(BYTES + extra)
            extra += 1
    return table


def byte_tokenizer() -> str:
    """tokenizer.json of the byte-level vocabulary: id b is byte b; encoding prepends the separator (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = byte_alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={char: byte for byte, char in alphabet.items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    separator = alphabet[DOC_SEPARATOR]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{separator} $A", pair=f"{separator} $A {separator} $B:1", special_tokens=[(separator, DOC_SEPARATOR)]
    )
    return tokenizer.to_str(pretty=True)


def is_byte_tokenizer(path: Path) -> bool:
    """Whether a tokenizer.json is byte_tokenizer's vocabulary (then text is bytes, as for a run without one)."""
    tree = read_json(path, "give a tokenizer.json", MAX_TOKENIZER_BYTES)
    model = tree.get("model") if isinstance(tree, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return False
    return model.get("vocab") == {char: byte for byte, char in byte_alphabet().items()}


@dataclass
class TokenizerFiles:
    """The files to write (name -> content) and the special token ids config.json states."""

    files: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(ID_KEYS.values()))


def read_tokenizer(path: Path) -> tuple[str, Any]:
    """A tokenizer.json's text and the `tokenizers` Tokenizer it makes; WeightsError when it makes none."""
    from tokenizers import Tokenizer

    data = read_regular(path, MAX_TOKENIZER_BYTES, "give the tokenizer.json the model was trained with")
    try:
        text = data.decode("utf-8")
        return text, Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise WeightsError(
            f"{path} is not a tokenizer.json ({reason}); give the one the model was trained with"
        ) from None


def for_run(tokenizer: Path | None, max_len: int) -> TokenizerFiles:
    """The files for a run's tokenizer.json (None: the run is byte-level)."""
    text, parsed = (byte_tokenizer(), None) if tokenizer is None else read_tokenizer(tokenizer)
    if parsed is None:
        end = byte_alphabet()[DOC_SEPARATOR]
        end_id: int | None = DOC_SEPARATOR
    else:
        end = next((token for token in END_TOKENS if parsed.token_to_id(token) is not None), None)
        end_id = parsed.token_to_id(end) if end is not None else None
    special = {key: end for key in ID_KEYS} if end is not None else {}
    ids = {ID_KEYS[key]: end_id for key in ID_KEYS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    files = {TOKENIZER: text, TOKENIZER_CONFIG: _json(config), SPECIAL_TOKENS_MAP: _json(special)}
    files[GENERATION_CONFIG] = _json({key: value for key, value in ids.items() if value is not None})
    return TokenizerFiles(files, ids)


def from_directory(directory: Path, config: dict[str, Any]) -> TokenizerFiles | None:
    """A Hugging Face directory's own tokenizer files, checked (check_special_tokens), to write again unchanged;
    None when it has no tokenizer.json."""
    if not is_regular(directory / TOKENIZER):
        return None
    text, _ = read_tokenizer(directory / TOKENIZER)
    check_special_tokens(directory)
    files = {TOKENIZER: text}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG):
        if is_regular(directory / name):
            files[name] = _json(read_json(directory / name, f"give a valid {name} or remove it"))
    ids = {key: config.get(key) if isinstance(config.get(key), int) else None for key in ID_KEYS.values()}
    return TokenizerFiles(files, ids)


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_special_tokens(directory: Path) -> None:
    """Every special token of the directory's tokenizer_config.json is in its tokenizer.json's vocabulary
    (transformers would otherwise add it as a new id beyond the model's embedding); WeightsError naming it."""
    if not is_regular(directory / TOKENIZER_CONFIG):
        return
    config = read_json(directory / TOKENIZER_CONFIG, "give a valid tokenizer_config.json or remove it")
    if not isinstance(config, dict):
        raise WeightsError(f"{directory / TOKENIZER_CONFIG} is not a JSON object; give a valid one or remove it")
    _, tokenizer = read_tokenizer(directory / TOKENIZER)
    extra = config.get("additional_special_tokens") or []
    named = [(key, _token(config.get(key))) for key in SPECIAL_KEYS]
    named += [("additional_special_tokens", _token(item)) for item in (extra if isinstance(extra, list) else [])]
    for key, token in named:
        if token is not None and tokenizer.token_to_id(token) is None:
            raise WeightsError(
                f"{directory / TOKENIZER_CONFIG}: {key} {token!r} is not in the vocabulary of {TOKENIZER} "
                "(transformers would add it as a new id the model has no embedding for); name a token of it"
            )


def write(files: TokenizerFiles, folder: Path) -> None:
    for name, content in files.files.items():
        (folder / name).write_text(content, encoding="utf-8")


def _json(tree: Any) -> str:
    return json.dumps(tree, indent=2, ensure_ascii=False) + "\n"
