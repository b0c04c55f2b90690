"""`make sample`: text from a trained run (or an export, or a Hugging Face checkpoint), streamed as it is made.

    python -m train.sample --run-dir RUN_DIR [--prompt TEXT] [--tokens 200] [--temperature 0.8]
        [--top-k 0] [--top-p 1] [--seed 1337] [--cache 1] [--speculate 0] [--device auto]

The text goes to stdout; the figures (tokens/s, the KV cache per token, speculation's acceptance
and speed-up) to stderr. Decoding runs with the model's cache (deepseek: MLA's latent KV cache,
train/models/deepseek.py; llama: grouped keys and values, train/models/llama.py): the prompt is read
in one forward (prefill), then one token per forward.
--cache 0 recomputes the whole context every token instead; greedy decoding (--temperature 0) gives
the same tokens both ways.

--speculate 1 drafts with the first MTP module and verifies with the main model, as the
DeepSeek-V3 report (section 2.2) proposes: from the main model's last hidden state and the
embedding of the token just emitted, the MTP block drafts the token after next; one cached
forward of the main model over [token just emitted, draft] yields the next token and, when it
equals the draft, the one after it as well; otherwise the draft's cache entry is rolled back.
Every emitted token is drawn from the main model's distribution at its position, in order, from
the same RNG, so greedy output is identical to plain greedy decoding, and sampled output with the
same SEED is too (up to float rounding: the verify forward reads two positions at once).

Context longer than model.max_seq_len: a sliding window. When the next token would need more
positions than the model has, the oldest tokens are dropped so that the newest max_seq_len/2
remain, and those are read again (the cache holds absolute RoPE positions, so it is rebuilt).
Byte-level models (vocabulary 256, no tokenizer) start the context with the document separator
(NUL), as every training document begins after one; so do exports of them, whose tokenizer.json is the
byte tokenizer (train/hf/tokenizer_files.py). Any other tokenizer.json of the run, the export or beside the
run's token file is used through Hugging Face `tokenizers`.
"""

from __future__ import annotations

import codecs
import math
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from env.common.cli import ArgumentParser, UserError, run_cli
from train.checkpoint import CheckpointError
from train.errors import ConfigError
from train.models import get_spec
from train.models.spec import Decoder
from train.tokenizer import load_tokenizer
from train.weights import WeightsError, build_loaded_model, model_config, model_tokenizer, saved_config

BYTE_VOCAB = 256
DOC_SEPARATOR = 0  # train/data.py DOC_SEPARATOR: every document ends with a NUL byte


class SampleError(UserError):
    """A sampling request that cannot be served; one line with the fix."""


# ---------------------------------------------------------------------------------------------
# Text in and out


def printable(text: str) -> str:
    """Model output made safe for a terminal: control characters (escape sequences, NUL, CR) become U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in text)


class ByteCodec:
    """Byte-level text: a token is a byte."""

    name = "bytes"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.text_vocab = min(vocab_size, BYTE_VOCAB)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def encode(self, prompt: str) -> list[int]:
        data = os.fsencode(prompt)  # the bytes as given, also when they are not UTF-8
        for offset, byte in enumerate(data):
            if byte >= self.vocab_size:
                raise SampleError(
                    f"PROMPT byte 0x{byte:02x} at offset {offset} is outside this model's {self.vocab_size}-byte "
                    f"vocabulary; use bytes below {self.vocab_size}"
                )
        return [DOC_SEPARATOR, *data]

    def stream(self, tokens: Sequence[int]) -> str:
        return self._decoder.decode(bytes(tokens))

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


class TokenizerCodec:
    """A Hugging Face tokenizer.json."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        try:
            import tokenizers  # noqa: F401 - only a run with a tokenizer needs the package
        except ImportError:
            raise SampleError(f"{path} needs the `tokenizers` package; install requirements.txt") from None
        # Through the one bounded reader: a FIFO or /dev/zero planted as tokenizer.json is one line, not a hang.
        self.tokenizer = load_tokenizer(path, "put the tokenizer.json the run used there")
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise SampleError(
                f"tokenizer {path} has {size} tokens but the model's vocabulary is {vocab_size}; "
                "use the tokenizer the run was trained with"
            )
        self.name = f"tokenizer {path}"
        self.vocab_size = vocab_size
        self.text_vocab = size
        self._generated: list[int] = []
        self._shown = ""

    def encode(self, prompt: str) -> list[int]:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise SampleError("PROMPT is not valid UTF-8, which a tokenizer needs; pass UTF-8 text") from None
        if not prompt:
            raise SampleError("PROMPT is empty; a tokenizer model needs some text to continue, e.g. PROMPT='def '")
        encoding = self.tokenizer.encode(prompt, add_special_tokens=False)
        unknown = getattr(self.tokenizer.model, "unk_token", None)
        unknown_id = self.tokenizer.token_to_id(unknown) if unknown else None
        covered = [False] * len(prompt)
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id == unknown_id:
                raise SampleError(f"PROMPT text {prompt[begin:end]!r} is outside the tokenizer (it becomes {unknown})")
            covered[begin:end] = [True] * (end - begin)
        lost = next((i for i, ch in enumerate(prompt) if not covered[i] and not ch.isspace()), None)
        if lost is not None or not encoding.ids:
            where = lost or 0
            raise SampleError(f"PROMPT character {prompt[where]!r} at {where} is outside the tokenizer; remove it")
        return list(encoding.ids)

    def stream(self, tokens: Sequence[int]) -> str:
        """The text the new tokens add, held back while it ends in a partial character."""
        self._generated.extend(tokens)
        text = self.tokenizer.decode(self._generated)
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""
        new, self._shown = text[len(self._shown) :], text
        return new

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))


def make_codec(path: Path, config: dict[str, Any], vocab_size: int) -> ByteCodec | TokenizerCodec:
    """Text in and out as the weights read it: their tokenizer.json, or bytes; never bytes for a tokenizer's ids."""
    made_by, tokenizer = model_tokenizer(path, config)
    if tokenizer is not None:
        return TokenizerCodec(tokenizer, vocab_size)
    if made_by.kind == "bytes" or (made_by.kind == "any" and vocab_size <= BYTE_VOCAB):
        return ByteCodec(vocab_size)
    what = f"trained on ids of {made_by.describe()}" if made_by.kind == "tokenizer" else "trained with a tokenizer"
    raise SampleError(
        f"{path} was {what} (a {vocab_size}-token vocabulary) but has no tokenizer.json (nor beside its token "
        "file); copy the run's tokenizer.json into it"
    )


# ---------------------------------------------------------------------------------------------
# Choosing tokens


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    # Ids the text can hold (the tokenizer's size): a model's vocabulary may be padded beyond it (llama-124m's
    # 50,304 against GPT-2's 50,257), and a padding id would print as nothing. None: every id.
    vocab_limit: int | None = None

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """One token from logits [vocab]: the argmax when greedy, else a draw after temperature, top-k, top-p.

        In float64, the precision TEMPERATURE and TOP_P are checked in, and with the largest logit moved to
        0 first: any temperature float64 holds (1e-300) sends every other token to -inf (never inf - inf),
        and any TOP_P above 0 keeps at least the likeliest token.
        """
        logits = logits[: self.vocab_limit]
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits.double()
        logits = (logits - logits.max()) / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(descending=True)
            probs = ordered.softmax(-1)
            # Drop a token once the more likely ones already cover top_p; the most likely always stays.
            drop = probs.cumsum(-1) - probs >= self.top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def window_start(length: int, start: int, max_len: int) -> int:
    """Where the context of the token at index `length` begins: `start` while it fits in max_len
    positions, else moved on so that the newest max_len // 2 tokens remain."""
    if length - start <= max_len:
        return start
    return length - max(1, max_len // 2)


@dataclass
class Result:
    tokens: list[int]  # the generated ones
    seconds: float
    prefill_seconds: float = 0.0
    main_forwards: int = 0
    drafts: int = 0
    accepted: int = 0
    windows: int = 0  # times the context slid

    @property
    def tokens_per_sec(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafts if self.drafts else None


@dataclass
class Generator:
    """Decodes `count` tokens after `prompt` with one of three methods; `emit` sees each new piece."""

    model: Decoder
    sampling: Sampling
    seed: int
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    emit: Callable[[list[int]], None] = field(default=lambda tokens: None)

    def run(self, prompt: list[int], count: int, *, cache: bool = True, speculate: bool = False) -> Result:
        """Generate `count` tokens; the same seed gives the same draws on every call."""
        self.rng = torch.Generator(device=self.device).manual_seed(self.seed)
        self.max_len = self.model.max_seq_len
        method = self._speculative if speculate else self._cached if cache else self._uncached
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with torch.inference_mode(), autocast:
            self._sync()
            began = time.perf_counter()
            result = Result([], 0.0)
            method(list(prompt), count, result, began)
            self._sync()
            result.seconds = time.perf_counter() - began
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=self.device)

    def _take(self, result: Result, tokens: list[int], new: list[int]) -> None:
        tokens.extend(new)
        result.tokens.extend(new)
        self.emit(new)

    def _uncached(self, tokens: list[int], count: int, result: Result, began: float) -> None:
        start = 0
        while len(result.tokens) < count:
            moved = window_start(len(tokens), start, self.max_len)
            result.windows += moved != start and bool(result.tokens)
            start = moved
            logits = self.model(self._ids(tokens[start:]))[0, -1]
            result.main_forwards += 1
            self._take(result, tokens, [self.sampling.pick(logits, self.rng)])

    def _prefill(self, tokens: list[int], start: int, result: Result, began: float) -> tuple[Any, torch.Tensor, Any]:
        """A fresh cache holding tokens[start:]: (cache, last logits, hidden states)."""
        cache = self.model.new_cache(dtype=self.autocast_dtype)
        logits, hidden = self.model.forward_cached(self._ids(tokens[start:]), cache)
        result.main_forwards += 1
        if not result.prefill_seconds:
            self._sync()
            result.prefill_seconds = time.perf_counter() - began
        return cache, logits[0, -1], hidden

    def _cached(self, tokens: list[int], count: int, result: Result, began: float) -> None:
        start = window_start(len(tokens), 0, self.max_len)
        cache, logits, _ = self._prefill(tokens, start, result, began)
        while True:
            self._take(result, tokens, [self.sampling.pick(logits, self.rng)])
            if len(result.tokens) >= count:
                return
            moved = window_start(len(tokens), start, self.max_len)
            if moved != start:
                start, result.windows = moved, result.windows + 1
                cache, logits, _ = self._prefill(tokens, start, result, began)
            else:
                step_logits, _ = self.model.forward_cached(self._ids(tokens[-1:]), cache)
                result.main_forwards += 1
                logits = step_logits[0, -1]

    def _speculative(self, tokens: list[int], count: int, result: Result, began: float) -> None:
        """Invariant at the top of the loop, with j = len(tokens): the main cache holds tokens[start:j-1]
        (the last token is not fed yet), the MTP cache the same positions, and `draft` is its guess
        for token j."""
        start: int | None = None
        while len(result.tokens) < count:
            j = len(tokens)
            moved = window_start(j, start or 0, self.max_len)
            if start is None or moved != start:
                # First, or after a slide: read the window, take token j, then let the MTP catch up.
                result.windows += start is not None
                start = moved
                main, logits, hidden = self._prefill(tokens, start, result, began)
                self._take(result, tokens, [self.sampling.pick(logits, self.rng)])
                mtp = self.model.new_draft_cache(dtype=self.autocast_dtype)
                draft = self._draft(hidden, tokens[start + 1 :], mtp)
                continue
            if window_start(j + 1, start, self.max_len) != start or count - len(result.tokens) == 1:
                # No room for a draft in this window, or one token left: a plain step.
                logits, hidden = self.model.forward_cached(self._ids(tokens[-1:]), main)
                result.main_forwards += 1
                self._take(result, tokens, [self.sampling.pick(logits[0, -1], self.rng)])
                draft = self._draft(hidden, tokens[-1:], mtp)
                continue
            logits, hidden = self.model.forward_cached(self._ids([tokens[-1], draft]), main)
            result.main_forwards += 1
            result.drafts += 1
            token = self.sampling.pick(logits[0, 0], self.rng)
            if token == draft:  # the second position saw the right context: its token counts too
                result.accepted += 1
                after = self.sampling.pick(logits[0, 1], self.rng)
                self._take(result, tokens, [token, after])
                draft = self._draft(hidden, [token, after], mtp)
            else:
                main.rollback(main.position - 1)
                self._take(result, tokens, [token])
                draft = self._draft(hidden[:, :1], [token], mtp)

    def _draft(self, hidden: torch.Tensor, next_tokens: list[int], mtp: Any) -> int:
        logits = self.model.draft_cached(hidden, self._ids(next_tokens), mtp)[0, -1]
        return int(logits[: self.sampling.vocab_limit].argmax())


# ---------------------------------------------------------------------------------------------
# The command line


def _number(
    kind: type, name: str, check: Callable[[Any], bool], rule: str, most: int | None = None
) -> Callable[[str], Any]:
    """A parser of a value of `kind` (int, or a finite float64, the precision sampling uses it in) that check() takes.

    rule says what it must be; a value above `most` is told it must be at most that, not the rule's other side.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text) if text.isascii() else kind("not ASCII")  # int() also takes '١' or '²'
        except ValueError:
            raise SampleError(f"{name}={text!r} is not a number; {name} must be {rule}") from None
        if kind is float and not math.isfinite(value):
            raise SampleError(f"{name}={text} is not a finite number (float64); {name} must be {rule}")
        if most is not None and value > most:
            raise SampleError(f"{name}={text} is out of range; {name} must be at most {most:,} ({rule})")
        if not check(value):
            raise SampleError(f"{name}={text} is out of range; {name} must be {rule}")
        return value

    return parse


SWITCH_RULE = "0 or 1"
# TOKENS beyond this is a typo, not a sample: the generated ids are kept in memory until the end.
MAX_TOKENS = 1_000_000
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, as train.seed's


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="a run directory (its newest valid checkpoint) or an export")
    parser.add_argument("--prompt", default="", help="the text to continue (default: a new document)")
    parser.add_argument("--tokens", default="200", help="tokens to generate (default 200)")
    parser.add_argument("--temperature", default="0.8", help="0 is greedy (default 0.8)")
    parser.add_argument("--top-k", default="0", help="keep the k most likely tokens; 0 is off (default)")
    parser.add_argument("--top-p", default="1", help="nucleus sampling, in (0, 1]; 1 is off (default)")
    parser.add_argument("--seed", default="1337", help="the sampling RNG's seed")
    parser.add_argument("--cache", default="1", help="1: the model's KV cache (default); 0: recompute every token")
    parser.add_argument("--speculate", default="0", help="1: MTP drafts, the main model verifies")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # A prompt may start with '-': take the value after --prompt as it is.
    args = list(sys.argv[1:] if argv is None else argv)
    if "--prompt" in args[:-1]:
        at = args.index("--prompt")
        args[at : at + 2] = [f"--prompt={args[at + 1]}"]
    ns = parser.parse_args(args)
    if not ns.run_dir:
        raise SampleError("RUN_DIR is not set; give a run or export directory, e.g. make sample RUN_DIR=runs/tiny-x")
    ns.tokens = _number(int, "TOKENS", lambda v: 1 <= v <= MAX_TOKENS, f"a whole number from 1 to {MAX_TOKENS:,}")(
        ns.tokens
    )
    ns.temperature = _number(float, "TEMPERATURE", lambda v: 0 <= v < float("inf"), "0 (greedy) or more, e.g. 0.8")(
        ns.temperature
    )
    ns.top_k = _number(int, "TOP_K", lambda v: v >= 0, "a whole number, 0 (off) or more")(ns.top_k)
    ns.top_p = _number(float, "TOP_P", lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.9 (1 is off)")(ns.top_p)
    ns.seed = _number(int, "SEED", lambda v: v >= 0, "a whole number from 0 to 2**63 - 1", most=MAX_SEED)(ns.seed)
    ns.cache = _number(int, "CACHE", lambda v: v in (0, 1), SWITCH_RULE)(ns.cache) == 1
    ns.speculate = _number(int, "SPECULATE", lambda v: v in (0, 1), SWITCH_RULE)(ns.speculate) == 1
    if ns.speculate and not ns.cache:
        raise SampleError("SPECULATE=1 verifies drafts with the cache; drop CACHE=0")
    return ns


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda, but torch sees no CUDA GPU; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_language_model(run_dir: Path, device: torch.device) -> tuple[Decoder, dict[str, Any], int]:
    """The run's (or export's) model as its family's Decoder, refusing a family without one before building it."""
    try:
        cfg = model_config(saved_config(run_dir), run_dir)  # the arch first: no weights read for a ResNet
        spec = get_spec(cfg.arch)
        if spec.decoder is None:
            what = "an image classifier" if spec.inputs == "images" else "a model without a decoder"
            raise SampleError(
                f"{run_dir} holds a {cfg.arch} run, {what}; sampling needs a model family with a decoder "
                "(e.g. CONFIG=tiny)"
            )
        model, config, step = build_loaded_model(run_dir, device)
        return spec.decoder(model), config, step
    except (WeightsError, SampleError):
        raise
    except (ConfigError, CheckpointError) as exc:
        raise SampleError(str(exc)) from None


def cache_line(model: Decoder, dtype: torch.dtype | None) -> tuple[int, str]:
    """(cache bytes per token, one line saying what the cache holds against full keys and values)."""
    cache = model.new_cache(batch=1, dtype=dtype)
    return cache.bytes_per_token(), cache.describe()


def note(text: str) -> None:
    """A figure or remark, on stderr: stdout holds only the text."""
    print(f"torchrig sample: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    device = pick_device(args.device)
    model, config, step = load_language_model(run_dir, device)
    if args.speculate and not model.can_draft:
        raise SampleError(
            f"{run_dir} holds a model that cannot draft (model.arch={config['model']['arch']}; a deepseek model needs "
            "model.mtp_depth >= 1); drop SPECULATE=1"
        )
    codec = make_codec(run_dir, config, int(config["model"]["vocab_size"]))
    prompt = codec.encode(args.prompt)
    autocast = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    note(f"{run_dir} step {step}, model.arch={config['model']['arch']}, on {device.type}, text as {codec.name}")
    limit = model.max_seq_len
    if len(prompt) + args.tokens > limit:
        note(
            f"{len(prompt)} prompt + {args.tokens} new tokens exceed max_seq_len={limit}: a sliding window "
            f"(when full, the newest {max(1, limit // 2)} tokens are kept and read again)"
        )

    def show(tokens: list[int]) -> None:
        sys.stdout.write(printable(codec.stream(tokens)))
        sys.stdout.flush()

    sampling = Sampling(args.temperature, args.top_k, args.top_p, vocab_limit=codec.text_vocab)
    generator = Generator(model, sampling, args.seed, device, autocast, emit=show)
    sys.stdout.reconfigure(errors="replace")  # a terminal that is not UTF-8 still gets the text
    sys.stdout.write(printable(os.fsencode(args.prompt).decode("utf-8", errors="replace")))
    result = generator.run(prompt, args.tokens, cache=args.cache, speculate=args.speculate)
    sys.stdout.write("\n")
    sys.stdout.flush()
    method = "speculative (MTP draft, cached)" if args.speculate else "KV cache" if args.cache else "no cache"
    note(
        f"{len(result.tokens)} tokens in {result.seconds:.2f} s: {result.tokens_per_sec:,.1f} tokens/s ({method}; "
        f"prefill {result.prefill_seconds * 1000:.0f} ms, {result.main_forwards} main-model forwards, "
        f"{result.windows} window slides)"
    )
    if args.cache:
        note(cache_line(model, autocast)[1])
    if args.speculate:
        # No speed-up figure: a baseline timed at another moment, after a warm-up this run did not have, is not
        # a fair comparison on a machine whose load changes; the benchmark measures both, interleaved.
        acceptance = f"{result.acceptance:.1%}" if result.acceptance is not None else "n/a (no draft verified)"
        note(
            f"speculation: {result.accepted} of {result.drafts} drafts accepted ({acceptance}), "
            f"{len(result.tokens) / max(1, result.main_forwards):.2f} tokens per main-model forward (plain decoding: "
            "1.00); for its speed against plain decoding, measured fairly: python -m train.benchmarks.sample"
        )
    return 0


if __name__ == "__main__":
    run_cli("sample", main)
