"""How fast `make prepare` tokenizes, per process and as processes are added, and in how much memory.

    python -m train.benchmarks.prepare [--mb 200] [--procs 1,2,all] [--vocab 8192] [--dir DIR]

It writes the same seeded documents as JSON lines and as Parquet (about --mb MB of text), trains one
byte-level BPE of --vocab tokens on a slice of them, and prepares both with that tokenizer at each
process count, each run a fresh `python -m train.prepare` into its own output. For each it prints
the wall time, MB/s of text and tokens/s, in all and per process, the peak memory of the whole
process tree (the sum of every process's proportional set size, so pages the forked processes
share count once), and the scaling against linear (MB/s at N processes over N times MB/s at 1).
The references, on the same text and tokenizer:

- the floor: tokenizers' encode_batch called in a bare loop on the documents already in memory, in
  one process with one thread: the goal is a prepare at >= 0.8x of it per process;
- datasets.map with the same tokenizer (batched, num_proc as prepare's processes), from the Parquet
  file, as a datasets user would do it.

Every process count must give the same shards (their sha256 is checked and printed). Figures vary
with the machine and its load: compare runs from one machine, taken one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from env.common.cli import ArgumentParser, UserError, count_arg, run_cli
from train.benchmarks import benchmark_main
from train.prepare import available_cores

ROOT = Path(__file__).resolve().parent.parent.parent
# Documents: seeded words in sentences, of a few hundred words each (web documents' usual order of size).
VOCABULARY = 20_000
WORDS_PER_DOCUMENT = (50, 1500)
TRAIN_SLICE_MB = 8  # the BPE learns its merges from this much of the text: training is not what is measured
SAMPLE_S = 0.2  # how often the process tree's memory is read
GOAL_OF_FLOOR = 0.8


@dataclass
class Figure:
    what: str
    procs: int
    seconds: float
    text_bytes: int
    tokens: int
    peak_mib: float | None = None
    sha256: str = ""

    def mb_s(self) -> float:
        return self.text_bytes / self.seconds / 1e6


def write_corpus(folder: Path, megabytes: int) -> tuple[Path, Path, int]:
    """The same documents as folder/docs.jsonl and folder/docs.parquet; returns their text's UTF-8 bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, int(rng.integers(1, 11)))) for _ in range(VOCABULARY)]
    zipf = 1.0 / np.arange(1, VOCABULARY + 1)
    zipf /= zipf.sum()
    docs, size = [], 0
    while size < megabytes * 1e6:
        picks = rng.choice(VOCABULARY, int(rng.integers(*WORDS_PER_DOCUMENT)), p=zipf)
        text = " ".join(words[i] for i in picks).replace(" e ", ". E").replace(" t ", ",\nt ")
        docs.append(text)
        size += len(text.encode())
    jsonl, parquet = folder / "docs.jsonl", folder / "docs.parquet"
    with open(jsonl, "w", encoding="utf-8") as out:
        for text in docs:
            out.write(json.dumps({"text": text}) + "\n")
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=20_000)
    return jsonl, parquet, size


def train_tokenizer(jsonl: Path, vocab: int, out: Path) -> Path:
    from train.tokenizer import train_bpe

    texts, read = [], 0
    with open(jsonl, encoding="utf-8") as lines:
        for line in lines:
            texts.append(json.loads(line)["text"])
            read += len(texts[-1])
            if read > TRAIN_SLICE_MB * 1e6:
                break
    path = out / "bench.tokenizer.json"
    path.write_text(train_bpe(texts, vocab).to_str())
    return path


def tree_pss_mib(root: int) -> float:
    """The proportional set size of a process and all its descendants, in MiB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total / 1024


def peak_memory(process: subprocess.Popen, peak: list[float]) -> None:
    while process.poll() is None:
        peak[0] = max(peak[0], tree_pss_mib(process.pid))
        time.sleep(SAMPLE_S)


def run_prepare(source: Path, tokenizer: Path, procs: int, out: Path, text_bytes: int) -> Figure:
    output = out / f"{source.suffix[1:]}-{procs}" / "x.bin"
    command = [sys.executable, "-m", "train.prepare", "--input", str(source), "--output", str(output),
               "--tokenizer", str(tokenizer), "--procs", str(procs)]  # fmt: skip
    peak = [0.0]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=peak_memory, args=(process, peak), daemon=True)
    watcher.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    watcher.join()
    if process.returncode != 0:
        raise UserError(f"prepare of {source.name} with {procs} processes failed: {stderr.strip()[-300:]}")
    manifest = json.loads(output.with_suffix(".json").read_text())
    return Figure(f"prepare {source.suffix[1:]}", procs, seconds, text_bytes, manifest["count"], peak[0],
                  manifest["sha256"])  # fmt: skip


def floor(jsonl: Path, tokenizer: Path, text_bytes: int) -> Figure:
    """tokenizers' encode_batch in a bare loop, one thread, on the documents in memory in batches of about 1 MiB."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(tokenizer))
    with open(jsonl, encoding="utf-8") as lines:
        docs = [json.loads(line)["text"] for line in lines]
    batches, batch, size = [], [], 0
    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    tokens, started = 0, time.perf_counter()
    for batch in batches:
        tokens += sum(len(encoding.ids) for encoding in encoder.encode_batch(batch, add_special_tokens=False))
    return Figure("encode_batch floor", 1, time.perf_counter() - started, text_bytes, tokens)


def datasets_map(parquet: Path, tokenizer: Path, procs: int, out: Path, text_bytes: int) -> Figure:
    """datasets.map of the same tokenizer over the Parquet file, as a datasets user would run it."""
    code = f"""
import os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import datasets
from tokenizers import Tokenizer
datasets.disable_progress_bars()
tokenizer = Tokenizer.from_file({str(tokenizer)!r})
def encode(batch):
    return {{"ids": [e.ids for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]}}
started = time.perf_counter()
ds = datasets.load_dataset("parquet", data_files={str(parquet)!r}, split="train", cache_dir={str(out / "hf")!r})
mapped = ds.map(encode, batched=True, num_proc={procs if procs > 1 else None}, remove_columns=["text"])
print(time.perf_counter() - started, sum(len(ids) for ids in mapped["ids"]))
"""
    peak = [0.0]
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=peak_memory, args=(process, peak), daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    watcher.join()
    shutil.rmtree(out / "hf", ignore_errors=True)
    if process.returncode != 0:
        raise UserError(f"datasets.map with {procs} processes failed: {stderr.strip()[-300:]}")
    seconds, tokens = stdout.split()[-2:]
    return Figure("datasets.map", procs, float(seconds), text_bytes, int(tokens), peak[0])


def table(figures: list[Figure], base: Figure) -> str:
    one = {f.what: f for f in figures if f.procs == 1}
    lines = [
        f"{'what':<22}{'procs':>6}{'s':>8}{'MB/s':>9}{'MB/s/proc':>11}{'tok/s/proc':>12}{'x floor':>9}"
        f"{'x linear':>10}{'peak MiB':>10}  sha256",
    ]
    for f in [base, *figures]:
        per = f.mb_s() / f.procs
        linear = f.mb_s() / (f.procs * one[f.what].mb_s()) if f.what in one else float("nan")
        peak = f"{f.peak_mib:10,.0f}" if f.peak_mib is not None else f"{'':>10}"
        tokens = f.tokens / f.seconds / f.procs
        lines.append(
            f"{f.what:<22}{f.procs:>6}{f.seconds:>8.1f}{f.mb_s():>9.2f}{per:>11.2f}{tokens:>12,.0f}"
            f"{per / base.mb_s():>9.2f}{linear:>10.2f}{peak}  {f.sha256[:12]}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=count_arg("--mb"), default=200, help="MB of text in each format (default 200)")
    parser.add_argument("--procs", default="1,2,all", help="process counts, 'all' for every core (default 1,2,all)")
    parser.add_argument("--vocab", type=count_arg("--vocab"), default=8192, help="the BPE's vocabulary")
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--no-datasets", action="store_true", help="leave out the datasets.map reference")
    args = parser.parse_args(argv)
    cores = available_cores()
    try:
        counts = sorted({cores if part == "all" else int(part) for part in args.procs.split(",")})
    except ValueError:
        raise UserError(f"--procs={args.procs!r} is not a comma list of counts or 'all', e.g. 1,2,all") from None
    if args.mb < 1 or not counts or counts[0] < 1 or counts[-1] > cores:
        raise UserError(f"--mb must be at least 1 and --procs from 1 to the {cores} cores; got {args.mb}, {args.procs}")
    args.counts = counts
    return args


def run(args: argparse.Namespace) -> None:
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        jsonl, parquet, text_bytes = write_corpus(folder, args.mb)
        say(f"{text_bytes / 1e6:,.1f} MB of text ({jsonl.stat().st_size / 1e6:,.1f} MB of JSON lines) per format")
        tokenizer = train_tokenizer(jsonl, args.vocab, folder)
        figures = []
        for source in (jsonl, parquet):
            for procs in args.counts:
                figures.append(run_prepare(source, tokenizer, procs, folder, text_bytes))
                say(f"{figures[-1].what} at {procs}: {figures[-1].seconds:.1f} s")
        for procs in [] if args.no_datasets else args.counts:
            figures.append(datasets_map(parquet, tokenizer, procs, folder, text_bytes))
            say(f"datasets.map at {procs}: {figures[-1].seconds:.1f} s")
        base = floor(jsonl, tokenizer, text_bytes)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    digests = {f.sha256 for f in figures if f.sha256}
    print(f"BPE of {args.vocab:,} tokens, {available_cores()} cores")
    print(table(figures, base))
    print(f"same shards at every process count and format: {'yes' if len(digests) == 1 else 'NO'}")
    best = max(f.mb_s() / f.procs for f in figures if f.what.startswith("prepare"))
    print(f"best prepare per process: {best / base.mb_s():.2f}x the floor (goal >= {GOAL_OF_FLOOR}x)")
    prepared = [f.peak_mib for f in figures if f.what.startswith("prepare") and f.peak_mib]
    print(f"prepare's peak memory (PSS of the process tree): {statistics.median(prepared):,.0f} MiB median, "
          f"{max(prepared):,.0f} MiB most")  # fmt: skip


def say(text: str) -> None:
    print(f"prepare-bench: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("prepare-bench", main)
