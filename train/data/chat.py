"""Chat and instruction data for `make prepare`: conversations rendered through the tokenizer's chat template as
transformers renders them, a mask of the tokens the loss learns, and whole conversations packed into windows.

Records are JSON lines (CHAT=1, or found when the first record has "messages", or "prompt" and "completion",
and no TEXT_FIELD):

| record | rendered as | learned (mask 1) |
|---|---|---|
| {"messages": [{"role", "content"}, ...]} | the messages | every assistant turn |
| {"prompt": str, "completion": str} | a user turn, then an assistant turn | the assistant turn |
| {"prompt": [messages], "completion": [messages]} | the prompt's, then the completion's (TRL) | its assistant turns |

Roles are system, user and assistant, and content is a string; a message's other keys reach the template as
they are. A line that is not JSON, an unknown role, empty messages, content that is not a string, or a first
message that is the assistant's (nothing prompts it) is one line naming the line. A record with no assistant
turn, or whose assistant turns the template renders as no text, has nothing to learn: it is dropped and counted in
the report (a template that renders no assistant turn for a user's '?' answered '!' is refused before
any record).

Rendering (`ChatRenderer`): transformers' own apply_chat_template on a PreTrainedTokenizerFast made of the
tokenizer.json, the template and the special tokens of tokenizer_config.json (bos_token, eos_token, ...), then
tokenized by it without added special tokens: the ids AutoTokenizer's apply_chat_template(messages) gives
(tests/train/test_chat.py checks it). The template is CHAT_TEMPLATE (a .jinja file) when given, else the
TOKENIZER directory's chat_template.jinja, else its tokenizer_config.json's "chat_template" ("default" of a
list), in the order transformers reads them. The files found in the directory are never followed when they are
symlinks (a link to a private file would put its text in the set's manifest): only CHAT_TEMPLATE, which the user
names, may be one.

A template runs in transformers' sandbox, and each conversation's rendering is bounded in time (RENDER_SECONDS);
a template that fails, runs out of time or of memory is one line naming the template and the line it failed on.

Masks: an assistant turn is the text the conversation gains from the generation prompt before it
(add_generation_prompt=True) to the turn itself: its content and what the template closes it with (an
end-of-turn or eos token), which is what the model must learn to write. A token is learned when it starts
inside such a text. This needs a template that renders a conversation's beginning as the beginning of the
whole (ChatML, Llama 3, DeepSeek V2 and V3, Mistral do); one that rewrites earlier turns (a reasoning template
dropping past thinking) is refused naming the line.

Packing (`Packer`): a conversation is its ids, then the end-of-document id (the eos_token, else the
tokenizer's end-of-text token; not repeated when the rendering ends with it); its first token is never
learned. Conversations go in input order into the training windows of SEQ_LEN = T tokens (window i holds
tokens iT..iT+T, train/data/sources.py): one that does not fit the rest of its window starts the next one,
the rest filled with the end-of-document id (mask 0), so no window holds part of a conversation without its
beginning, and the last window is filled so that none is cut off. A conversation longer than a window (T+1
tokens) is truncated to it, or dropped when what remains learns nothing. Attention still crosses the
conversations within a window, as it crosses the documents of plain text (the model is causal, with no
document mask); only the loss is kept to each conversation's own assistant tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from env.common.readfile import ReadRefused, parse_json, read_bounded
from train.data.formats import FORMATS, Input, Meter, Unit
from train.data.streams import read_small
from train.errors import DataError

# train.hf and transformers import torch: they are imported where a chat prepare needs them, so that detecting
# chat records costs a text prepare nothing.
ROLES = ("system", "user", "assistant")
LEARNED_ROLE = "assistant"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# A chat template larger than this is not one (the largest public ones are tens of KB).
TEMPLATE_LIMIT = 1 << 20
# A tokenizer_config.json or special_tokens_map.json larger than this is not one (public ones are tens of KB).
CONFIG_LIMIT = 16 << 20
# The longest one conversation's rendering may take. The sandbox bounds what a template may call, not how long it
# loops: nested loops over range() would render forever. A real template renders a conversation in milliseconds,
# so this only stops a runaway one, in a prepare's time, without refusing a slow but finite one.
RENDER_SECONDS = 10.0
# What a report says of each count a chat prepare keeps (its tally), in this order.
TALLY = {
    "conversations": "conversations read",
    "kept": "packed",
    "truncated": "truncated to a window",
    "too_long": "dropped: nothing learned within a window",
    "no_assistant": "dropped: no assistant turn",
    "learned_tokens": "tokens learned",
    "padding_tokens": "padding tokens",
}


# ---------------------------------------------------------------------------- the template


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it renders with (picklable, for the tokenizer processes)."""

    text: str
    origin: str  # where it was read, for messages
    specials: tuple[tuple[str, Any], ...] = ()  # (bos_token, "<s>"), ...; additional_special_tokens a list

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        """What the set's manifest keeps of it: the template itself, so the set says how it was rendered."""
        return {"origin": self.origin, "sha256": self.sha256, "template": self.text, "specials": dict(self.specials)}


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_found(path: Path, limit: int, fix: str) -> bytes | None:
    """A file found in the TOKENIZER directory (None when absent), never through a symlink: the user did not name
    it, and a link could carry any file the user can read into the set's manifest. The one exception is a
    Hugging Face cache's snapshot, whose files are links into the same repository's blobs/ (_within_repository)."""
    try:
        return read_bounded(path, limit, follow=_within_repository(path))
    except ReadRefused as exc:
        if exc.missing:
            return None
        if os.path.islink(path):
            raise DataError(f"{path} is a symlink, which prepare never follows; copy the file itself there") from None
        raise DataError(f"{path} {exc.reason}; {fix}") from None


def _within_repository(path: Path) -> bool:
    """A Hugging Face cache's snapshot file: <repo>/snapshots/<rev>/<name>, a link to a file of <repo>/blobs/.
    Only such a link is followed; a link anywhere else is not."""
    if not os.path.islink(path):
        return False
    folder = path.absolute().parent
    if folder.parent.name != "snapshots":
        return False
    return path.resolve().parent == (folder.parent.parent / "blobs").resolve()


def _found_json(path: Path) -> Any:
    """A JSON file found in the TOKENIZER directory (_read_found), parsed; None when absent."""
    fix = f"give a valid {path.name} or remove it"
    content = _read_found(path, CONFIG_LIMIT, fix)
    if content is None:
        return None
    try:
        return parse_json(content)
    except ReadRefused as exc:
        raise DataError(f"{path} {exc.reason}; {fix}") from None


def _specials(directory: Path) -> dict[str, Any]:
    """The special tokens transformers gives a template: tokenizer_config.json's; special_tokens_map.json's over
    them only where tokenizer_config.json has no added_tokens_decoder (transformers' legacy path, which reads it)."""
    from train.hf.tokenizer_files import SPECIAL_KEYS, TOKENIZER_CONFIG

    found: dict[str, Any] = {}
    legacy = True
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        tree = _found_json(directory / name) if legacy else None
        if tree is None:
            continue
        if not isinstance(tree, dict):
            raise DataError(f"{directory / name} is not a JSON object; give a valid one or remove it")
        legacy = "added_tokens_decoder" not in tree
        for key in SPECIAL_KEYS:
            if _token(tree.get(key)) is not None:
                found[key] = _token(tree.get(key))
        extra = tree.get("additional_special_tokens")
        if isinstance(extra, list):  # the map's are added to the config's, as transformers does
            known = found.get("additional_special_tokens", [])
            found["additional_special_tokens"] = known + [t for t in map(_token, extra) if t and t not in known]
    if not found.get("additional_special_tokens"):
        found.pop("additional_special_tokens", None)
    return found


def _decode_template(content: bytes, where: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; give a Jinja chat template") from None


def _named_template(path: Path, where: str) -> str:
    """CHAT_TEMPLATE: the file the user names (a symlink too: they named it)."""
    content = read_small(path, TEMPLATE_LIMIT)
    if content is None:
        raise DataError(f"{where} is not a regular file of at most {TEMPLATE_LIMIT >> 20} MiB; give a .jinja file")
    return _decode_template(content, where)


def _found_template(path: Path) -> str | None:
    """The TOKENIZER directory's chat_template.jinja (_read_found); None when absent."""
    content = _read_found(path, TEMPLATE_LIMIT, f"give a Jinja chat template of at most {TEMPLATE_LIMIT >> 20} MiB")
    return None if content is None else _decode_template(content, str(path))


def _config_template(directory: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones whose "default" is taken."""
    from train.hf.tokenizer_files import TOKENIZER_CONFIG

    config = _found_json(directory / TOKENIZER_CONFIG)
    value = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def find_template(tokenizer: str, template: str | None) -> ChatTemplate:
    """The chat template of TOKENIZER (a directory) or CHAT_TEMPLATE, with the directory's special tokens."""
    from train.hf.tokenizer_files import TOKENIZER_CONFIG

    directory = Path(tokenizer) if Path(tokenizer).is_dir() else None
    specials = _specials(directory) if directory is not None else {}
    frozen = tuple(sorted((key, tuple(v) if isinstance(v, list) else v) for key, v in specials.items()))
    if template:
        return ChatTemplate(_named_template(Path(template), f"CHAT_TEMPLATE={template}"), template, frozen)
    found = _found_template(directory / TEMPLATE_FILE) if directory is not None else None
    if found is not None:
        return ChatTemplate(found, str(directory / TEMPLATE_FILE), frozen)
    text = _config_template(directory) if directory is not None else None
    if text is None:
        what = "its tokenizer_config.json has no chat_template and there is no chat_template.jinja"
        if directory is None:
            what = "a tokenizer.json alone holds no chat template"
        raise DataError(
            f"TOKENIZER={tokenizer} has no chat template ({what}); give CHAT_TEMPLATE=<a .jinja file>, or "
            "TOKENIZER=<the model's directory with one>"
        )
    return ChatTemplate(text, str(directory / TOKENIZER_CONFIG), frozen)


def tokenizer_file(tokenizer: str) -> Path:
    """The tokenizer.json TOKENIZER names: the file itself, or a directory's."""
    path = Path(tokenizer)
    return path / "tokenizer.json" if path.is_dir() else path


# ---------------------------------------------------------------------------- records


@dataclass
class Conversation:
    """One record's messages, and which of them the loss learns."""

    messages: list[dict[str, Any]]
    learned: list[int]  # indices into messages


JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
              dict: "an object", str: "a string"}  # fmt: skip


def _kind(value: Any) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


def _messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    """A list of {"role", "content"} messages, each checked; DataError naming the line and the message."""
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} is {_kind(value)}, not a list of messages")
    if not value:
        raise DataError(f"{where}: {key!r} is empty; give its messages or remove the line")
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {number} of {key!r} is {_kind(message)}, not an object with role and content"
            )
        role = message.get("role")
        if role not in ROLES:
            shown = repr(role) if "role" in message else "no role"
            raise DataError(f"{where}: message {number} of {key!r} has {shown}, not one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {number} of {key!r}: content is {_kind(content)}, not a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: message {number} of {key!r} holds an unpaired surrogate; fix it") from None
    return value


def _completion(record: dict[str, Any], where: str) -> Conversation:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        strings = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Conversation(_messages(strings, "prompt", where), [1])
    if isinstance(prompt, list) and isinstance(completion, list):
        asked, answered = _messages(prompt, "prompt", where), _messages(completion, "completion", where)
        learned = [len(asked) + i for i, message in enumerate(answered) if message["role"] == LEARNED_ROLE]
        return Conversation(asked + answered, learned)
    raise DataError(
        f"{where}: prompt is {_kind(prompt)} and completion {_kind(completion)}; give both as strings or both as "
        "lists of messages"
    )


def conversation(raw: bytes, origin: str, line: int) -> Conversation:
    """A JSON line's conversation (the module docstring's records); DataError naming the line otherwise."""
    where = f"{origin} line {line}"
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DataError(f"{where} is not JSON ({detail}); fix or remove that line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is {_kind(record)}, not an object with messages (or prompt and completion)")
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        learned = [i for i, message in enumerate(messages) if message["role"] == LEARNED_ROLE]
        found = Conversation(messages, learned)
    elif "prompt" in record and "completion" in record:
        found = _completion(record, where)
    else:
        shown = ", ".join(list(record)[:20]) or "none"
        raise DataError(
            f'{where} has neither "messages" nor "prompt" and "completion" (its fields: {shown}); a chat '
            "prepare reads only conversations"
        )
    if found.learned and found.learned[0] == 0:
        raise DataError(f"{where}: the first message is the assistant's, with nothing before it; start with a user")
    return found


def looks_like_chat(source: Input, text_field: str) -> bool:
    """Whether a JSON lines input's first record is a conversation (and has no TEXT_FIELD): CHAT's default."""
    records = FORMATS["jsonl"].records(source, (0, 0), text_field, Meter())
    try:
        for raw, _, _ in records:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    return False  # not JSON: the text prepare names the line
                if not isinstance(record, dict) or text_field in record:
                    return False
                return "messages" in record or {"prompt", "completion"} <= record.keys()
    finally:
        records.close()
    return False


# ---------------------------------------------------------------------------- rendering


class NotIncremental(Exception):
    """The template renders a conversation's beginning otherwise once later turns follow (its message: the turn)."""


class RenderTimeout(BaseException):
    """A rendering ran past RENDER_SECONDS. Not an Exception: no `except Exception` in transformers or in a
    template's helpers may take it for a template error and go on rendering."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """RenderTimeout when the block runs past `seconds`: a SIGALRM timer, which only the main thread can receive.
    prepare renders in its main thread or in its tokenizer processes' (train/data/encode.py: a Pool's worker runs
    its tasks in its main thread); elsewhere (a caller's thread) the rendering is not bounded.

    The process has one real-time timer: a caller's own (a test runner's per-test timeout, a user's alarm) is
    kept. One due first fires its handler when it is due, and one due later is left with its remaining time. A
    repeating one fires once during the block (the ticks it would have fired again within it are dropped) and
    repeats from the block's end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    started = time.monotonic()
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer = {"pending": outer_delay > 0}

    def out_of_time(signum: int, frame: Any) -> None:
        elapsed = time.monotonic() - started
        if outer["pending"] and elapsed >= outer_delay - 1e-3:  # the caller's deadline came first: theirs to act on
            outer["pending"] = False
            _pass_on(previous, signum, frame)
            if elapsed < seconds:
                signal.setitimer(signal.ITIMER_REAL, seconds - elapsed)
                return
        raise RenderTimeout

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_delay) if outer_delay > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer["pending"]:
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), outer_interval)
        elif outer_delay > 0 and outer_interval > 0:
            signal.setitimer(signal.ITIMER_REAL, outer_interval, outer_interval)


def _pass_on(handler: Any, signum: int, frame: Any) -> None:
    """What the caller's SIGALRM disposition would have done with its own timer's signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:  # the default action ends the process: let it
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGALRM)


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


class ChatRenderer:
    """Conversations to ids and masks, through transformers' apply_chat_template (the module docstring)."""

    def __init__(self, template: ChatTemplate, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        specials = {key: list(value) if isinstance(value, tuple) else value for key, value in template.specials}
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(tokenizer_json), chat_template=template.text, **specials
        )

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def turns(self, conversation: Conversation, whole: str) -> list[tuple[int, int]]:
        """The character spans of the learned turns in the whole rendering; NotIncremental when the template does
        not render the conversation's beginning as the beginning of the whole."""
        spans = []
        for index in conversation.learned:
            before = self.render(conversation.messages[:index], generation_prompt=True)
            through = self.render(conversation.messages[: index + 1])
            if not (through.startswith(before) and whole.startswith(through)):
                raise NotIncremental(f"message {index + 1}")
            spans.append((len(before), len(through)))
        return spans

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray] | None:
        """The conversation's ids (as apply_chat_template(tokenize=True) gives them) and its mask: 1 where a
        token starts inside a learned turn; None when the template renders none of its learned turns (no text)."""
        whole = self.render(conversation.messages)
        spans = self.turns(conversation, whole)
        if all(begin == end for begin, end in spans):
            return None
        encoding = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for begin, end in spans:
            mask[(starts >= begin) & (starts < end)] = 1
        return ids, mask


def check_template(template: ChatTemplate, tokenizer_json: str, vocabulary: Any) -> None:
    """Before any record: the template compiles, and every special token it names is defined and in the vocabulary."""
    import jinja2

    from train.hf.tokenizer_files import SPECIAL_KEYS

    for key, value in template.specials:
        for token in value if isinstance(value, tuple) else (value,):
            if vocabulary.token_to_id(token) is None:
                raise DataError(
                    f"{template.origin}: {key} {token!r} is not in the tokenizer's vocabulary (transformers would add "
                    "it as a new id the model has no embedding for); give the tokenizer the model was trained with"
                )
    defined = {key for key, _ in template.specials}
    for key in SPECIAL_KEYS:
        if re.search(rf"\b{key}\b", template.text) and key not in defined:
            raise DataError(
                f"the chat template ({template.origin}) uses {key}, which TOKENIZER does not define; give "
                "TOKENIZER=<the model's directory>, whose tokenizer_config.json names its special tokens"
            )
    probe = Conversation([{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}], [1])
    renderer = ChatRenderer(template, tokenizer_json)
    try:
        with time_limit(RENDER_SECONDS):
            spans = renderer.turns(probe, renderer.render(probe.messages))
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(
            f"the chat template ({template.origin}) is not valid Jinja (line {exc.lineno}: {exc.message})"
        ) from None
    except RenderTimeout:
        raise DataError(
            f"the chat template ({template.origin}) took more than {RENDER_SECONDS:g} s to render a user's '?' "
            "answered '!'; fix the template"
        ) from None
    except Exception:  # a template may refuse this probe (raise_exception), or fail on it: the records decide
        return
    if spans[0][0] == spans[0][1]:
        raise DataError(
            f"the chat template ({template.origin}) renders no assistant turn (an assistant's '!' adds no text to "
            "the conversation), so there is nothing to learn; give CHAT_TEMPLATE=<a template that writes the "
            "assistant's turns>"
        )


# ---------------------------------------------------------------------------- a unit's conversations


@dataclass
class RenderedUnit:
    """A unit's conversations, rendered: (ids, mask) each, and its counts (the report's TALLY)."""

    conversations: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)


class ChatEncoder:
    """A JSON lines unit to its conversations' ids and masks (train/data/encode.py runs it in PROCS processes)."""

    def __init__(self, spec: Any) -> None:
        self.template: ChatTemplate = spec.chat
        self.renderer = ChatRenderer(spec.chat, spec.tokenizer_json)

    def __call__(self, unit: Unit) -> RenderedUnit:
        rendered = RenderedUnit()
        for line, raw in enumerate(unit.records, start=unit.start[1] + 1):
            if not raw.strip():
                continue
            found = conversation(raw, unit.origin, line)
            rendered.tally["conversations"] += 1
            encoded = self.encode(found, unit.origin, line) if found.learned else None
            if encoded is None:  # no assistant turn in the record, or none the template writes
                rendered.tally["no_assistant"] += 1
                continue
            rendered.conversations.append(encoded)
        return rendered

    def encode(self, found: Conversation, origin: str, line: int) -> tuple[np.ndarray, np.ndarray] | None:
        """ChatRenderer.encode within RENDER_SECONDS; a template's failure on the line as one DataError."""
        import jinja2

        template = self.template.origin
        try:
            with time_limit(RENDER_SECONDS):
                return self.renderer.encode(found)
        except NotIncremental as exc:
            raise DataError(
                f"{origin} line {line}: the chat template renders {exc} differently once later turns follow, "
                "so its tokens cannot be told apart; give CHAT_TEMPLATE=<a template that keeps earlier turns as "
                "they are>"
            ) from None
        except RenderTimeout:
            raise DataError(
                f"the chat template ({template}) took more than {RENDER_SECONDS:g} s to render line {line} of "
                f"{origin}; fix the template"
            ) from None
        except (MemoryError, OverflowError) as exc:
            raise DataError(
                f"the chat template ({template}) asks for more memory than there is on line {line} of {origin} "
                f"({_detail(exc)}); fix the template"
            ) from None
        except jinja2.TemplateError as exc:
            if type(exc) is jinja2.TemplateError:  # the template's raise_exception: it refuses the record
                raise DataError(
                    f"the chat template ({template}) refuses line {line} of {origin}: {_detail(exc)}; fix the "
                    "line, or give CHAT_TEMPLATE=<a template that takes it>"
                ) from None
            raise DataError(
                f"the chat template ({template}) failed on line {line} of {origin}: {_detail(exc)}; fix the template"
            ) from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            raise DataError(
                f"the chat template ({template}) failed on line {line} of {origin}: {_detail(exc)}; fix the template"
            ) from None


# ---------------------------------------------------------------------------- packing


class Packer:
    """Whole conversations into windows of seq_len (the module docstring); a pure function of the stream position,
    so a resumed prepare packs the rest exactly as an uninterrupted one."""

    def __init__(self, seq_len: int, end_id: int, alone: bool = False) -> None:
        self.seq_len = seq_len
        self.end_id = end_id
        # ALONE=1: every conversation starts a window of its own, so attention never sees another one (the rest
        # of the window is padding, which nothing learns); else windows are filled, and only the loss is kept
        # inside each conversation.
        self.alone = alone

    def pack(self, rendered: RenderedUnit, position: int, last: bool) -> tuple[np.ndarray, np.ndarray, Counter]:
        """A unit's ids and mask placed from stream position `position`; `last`: fill the final window."""
        window = self.seq_len + 1
        tally = Counter(rendered.tally)
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray] = []
        for ids, mask in rendered.conversations:
            if not len(ids) or ids[-1] != self.end_id:
                ids, mask = np.append(ids, self.end_id), np.append(mask, 0).astype(np.uint8)
            mask = mask.copy()
            mask[0] = 0  # nothing of the conversation comes before its first token
            if len(ids) > window:
                ids, mask = ids[:window], mask[:window]
                if not mask.any():
                    tally["too_long"] += 1
                    continue
                tally["truncated"] += 1
            offset = position % self.seq_len
            # Does not fit the rest of this window (or must be alone in one): start the next.
            if offset + len(ids) > window or (self.alone and offset):
                pad = self.seq_len - offset
                ids_parts.append(np.full(pad, self.end_id, np.int64))
                mask_parts.append(np.zeros(pad, np.uint8))
                tally["padding_tokens"] += pad
                position += pad
            ids_parts.append(ids)
            mask_parts.append(mask)
            position += len(ids)
            tally["kept"] += 1
            tally["learned_tokens"] += int(mask.sum())
        pad = (1 - position) % self.seq_len  # the set ends with a whole window: its length is kT + 1
        if last and position and pad:
            ids_parts.append(np.full(pad, self.end_id, np.int64))
            mask_parts.append(np.zeros(pad, np.uint8))
            tally["padding_tokens"] += pad
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8), tally
        return np.concatenate(ids_parts), np.concatenate(mask_parts), tally


def report(tally: dict[str, int]) -> str:
    """The chat counts of a prepare, one line."""
    return ", ".join(f"{tally.get(key, 0):,} {what}" for key, what in TALLY.items())
