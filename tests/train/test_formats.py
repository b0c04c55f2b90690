"""The formats public corpora come in: text, JSON lines (.jsonl, .gz, .zst), Parquet, datasets directories and
llm.c shards read by `make prepare`, one line for every bad input, and no structured file ever trained as bytes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datasets import Dataset, load_from_disk
from datasets.table import InMemoryTable

from tests.helpers.paths import ROOT
from tests.helpers.trainrun import launch_train, metrics
from train import prepare
from train.config_loader import load_config
from train.data import build_dataset, read_token_file
from train.data.formats import PIECE_BYTES
from train.errors import DataError
from train.tokenizer import load_tokenizer

WORDS = ["the", "data", "naïve", "café", "日本語", "🙂", "torch", "rig", "\n", "shard", "prepare", "\t"]
DOCUMENTS = 1000
LLMC_MAGIC, LLMC_VERSION = 20240520, 1


def documents(count: int = DOCUMENTS, long_one: bool = True) -> list[str]:
    """Seeded documents: multi-byte characters, empty ones, and (long_one) one longer than a piece, so cut."""
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, int(rng.integers(0, 60)))) for _ in range(count)]
    docs[3] = ""
    if long_one:
        docs[5] = "lorem ipsum dolor sit amet\n" * (PIECE_BYTES // 27 * 3 // 2)  # 1.5 pieces of text
    return docs


def write_every_format(folder: Path, docs: list[str]) -> dict[str, str]:
    """The same documents as JSON lines (plain, zstd, gzip), Parquet, a datasets directory and .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)).encode()
    (folder / "docs.jsonl").write_bytes(lines)
    (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (folder / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, folder / "docs.parquet", row_group_size=300)  # several row groups
    # A fingerprint given: datasets' own hashing of an in-memory table fails under pyarrow 26 (dill cannot
    # pickle pyarrow's MonthDayNano); save_to_disk writes the same directory either way.
    Dataset(InMemoryTable(table), fingerprint="test").save_to_disk(str(folder / "dataset"), num_shards=3)
    (folder / "txt").mkdir()
    for index, doc in enumerate(docs):
        (folder / "txt" / f"doc{index:04d}.txt").write_text(doc, encoding="utf-8")
    return {
        "jsonl": str(folder / "docs.jsonl"),
        "jsonl.zst": str(folder / "docs.jsonl.zst"),
        "jsonl.gz": str(folder / "docs.jsonl.gz"),
        "parquet": str(folder / "docs.parquet"),
        "datasets": str(folder / "dataset"),
        "txt": str(folder / "txt" / "*.txt"),
    }


def prepared(inputs: str | list[str], output: Path, **options: object) -> tuple[np.ndarray, dict]:
    prepare.prepare([inputs] if isinstance(inputs, str) else inputs, str(output), **options)  # type: ignore[arg-type]
    tokens, meta = read_token_file(output)
    return np.asarray(tokens), meta


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- the same documents, every format


@pytest.fixture(scope="module")
def every_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list[str]]:
    folder = tmp_path_factory.mktemp("formats")
    docs = documents()
    return folder, write_every_format(folder / "in", docs), docs


def test_every_format_gives_byte_identical_token_files(every_format: tuple[Path, dict[str, str], list[str]]) -> None:
    folder, inputs, docs = every_format
    # bytes: each document's UTF-8 then a NUL, whatever it came in
    expected = b"".join(doc.encode() + b"\0" for doc in docs)
    for name, source in inputs.items():
        tokens, meta = prepared(source, folder / "bytes" / f"{name}.bin")
        assert tokens.tobytes() == expected, name
        assert meta["tokenizer"]["kind"] == "bytes" and meta["tokenizer"]["sha256"], name
    # a BPE trained on the JSON lines, then given to every other format
    bpe_tokens, bpe_meta = prepared(inputs["jsonl"], folder / "bpe" / "jsonl.bin", tokenizer="bpe", vocab=400)
    tokenizer_file = folder / "bpe" / "jsonl.tokenizer.json"
    for name, source in inputs.items():
        tokens, meta = prepared(source, folder / "bpe" / f"given-{name}.bin", tokenizer=str(tokenizer_file))
        files = (folder / "bpe" / f"given-{name}.bin").read_bytes(), (folder / "bpe" / "jsonl.bin").read_bytes()
        assert files[0] == files[1], name
        assert meta["tokenizer"]["sha256"] == bpe_meta["tokenizer"]["sha256"], name
    # and the ids are the text: every document decodes back, byte for byte
    tokenizer = load_tokenizer(tokenizer_file)
    end = bpe_meta["tokenizer"]["end_of_document"]
    cuts = np.flatnonzero(bpe_tokens == end)
    decoded = [tokenizer.decode(part.tolist()) for part in np.split(bpe_tokens, cuts + 1)[:-1]]
    assert decoded == docs


def test_json_lines_prepared_as_bytes_are_the_text_not_the_json(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "héllo"}\n\n{"text": "x\\ny", "other": 3}\n')
    tokens, _ = prepared(str(tmp_path / "a.jsonl"), tmp_path / "o.bin")
    assert tokens.tobytes() == "héllo\0x\ny\0".encode()  # the blank line is no record


def test_text_field_names_the_field_and_a_missing_one_names_those_there_are(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"content": "abc", "id": 1}\n')
    pq.write_table(pa.table({"content": ["abc"], "id": [1]}), tmp_path / "a.parquet")
    Dataset(InMemoryTable(pa.table({"content": ["abc"]})), fingerprint="t").save_to_disk(str(tmp_path / "ds"))
    expected = {
        "a.jsonl": "has no field 'text' (its fields: content, id)",
        "a.parquet": "has no column 'text' (its columns: content, id)",
        "ds": "has no column 'text' (its columns: content)",
    }
    for source, says in expected.items():
        with pytest.raises(DataError) as error:
            prepare.prepare([str(tmp_path / source)], str(tmp_path / "o.bin"))
        assert says in one_line(error) and "set TEXT_FIELD" in one_line(error), source
        tokens, _ = prepared(str(tmp_path / source), tmp_path / f"{source}.bin", text_field="content")
        assert tokens.tobytes() == b"abc\0", source


def test_the_format_is_decided_by_the_bytes_as_well_as_the_name(tmp_path: Path) -> None:
    lines = b'{"text": "abc"}\n'
    (tmp_path / "looks-plain.jsonl").write_bytes(zstandard.ZstdCompressor().compress(lines))  # zstd named .jsonl
    (tmp_path / "records").write_bytes(lines)  # no extension: a JSON object per line
    (tmp_path / "notes.txt").write_bytes(lines)  # named text: its JSON is text
    assert prepared(str(tmp_path / "looks-plain.jsonl"), tmp_path / "a.bin")[0].tobytes() == b"abc\0"
    assert prepared(str(tmp_path / "records"), tmp_path / "b.bin")[0].tobytes() == b"abc\0"
    assert prepared(str(tmp_path / "notes.txt"), tmp_path / "c.bin")[0].tobytes() == lines + b"\0"


# ---------------------------------------------------------------------------- structured data where text is expected


def test_structured_or_compressed_files_are_refused_where_text_is_expected(tmp_path: Path) -> None:
    """Before: a .jsonl trained as raw JSON and a .parquet as compressed bytes, without a word."""
    docs = documents(40, long_one=False)
    inputs = write_every_format(tmp_path, docs)
    for name in ("jsonl", "jsonl.zst", "jsonl.gz", "parquet"):
        cfg = load_config("tiny", [f"data.path={inputs[name]}"])
        with pytest.raises(DataError) as error:
            build_dataset(cfg)
        assert "not text" in one_line(error) and "make prepare INPUT=" in one_line(error), name
    mixed = load_config("tiny", [f"data.path={tmp_path}/docs.*"])  # a glob over JSON lines and Parquet
    with pytest.raises(DataError, match="not text"):
        build_dataset(mixed)
    # eval's DATA through the run's tokenizer reads text the same way
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="make prepare"):
        list(prepare.encode_files([tmp_path / "t.jsonl"], load_tokenizer_for_test(tmp_path)))


def load_tokenizer_for_test(folder: Path) -> object:
    (folder / "text").mkdir(exist_ok=True)
    (folder / "text" / "a.txt").write_text("some text to learn a few merges from\n" * 20)
    prepare.prepare([str(folder / "text" / "a.txt")], str(folder / "tok.bin"), "bpe", 300)
    return load_tokenizer(folder / "tok.tokenizer.json")


def test_the_refusal_on_the_command_line_is_one_line_and_trains_nothing(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["abc"] * 50}), tmp_path / "x.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "train.launch", "--gpus", "1", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
         "--steps", "1", f"data.path={tmp_path / 'x.parquet'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "not text" in line]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "make prepare INPUT=" in lines[0] and not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- bad input: one line, nothing lost


def bad_inputs(folder: Path) -> dict[str, tuple[list[str], dict, str]]:
    """name -> (INPUT, prepare options, what the one line must say)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = b'{"text": "fine"}\n'
    (folder / "bad.jsonl").write_bytes(good * 6 + b'{"text": "broken\n' + good)
    pq.write_table(pa.table({"body": ["a"]}), folder / "nocol.parquet")
    whole = zstandard.ZstdCompressor().compress(good * 1000)
    (folder / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    (folder / "garbled.jsonl.zst").write_bytes(whole[:12] + b"\xff" * 40 + whole[52:])
    (folder / "cut.jsonl.gz").write_bytes(gzip.compress(good * 1000)[:-30])
    (folder / "mix").mkdir()
    (folder / "mix" / "a.jsonl").write_bytes(good)
    pq.write_table(pa.table({"text": ["a"]}), folder / "mix" / "b.parquet")
    (folder / "fake.parquet").write_bytes(b"not parquet at all\n")
    (folder / "x.bz2").write_bytes(b"BZh91AY&SY" + b"\0" * 20)
    header = np.zeros(256, "<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, 100)
    (folder / "short.bin").write_bytes(header.tobytes() + np.arange(50, dtype="<u2").tobytes())
    header[1] = 7
    (folder / "version.bin").write_bytes(header.tobytes() + np.arange(100, dtype="<u2").tobytes())
    (folder / "null.jsonl").write_bytes(b'{"text": null}\n')
    return {
        "not JSON": ([str(folder / "bad.jsonl")], {}, "bad.jsonl line 7 is not JSON"),
        "no column": ([str(folder / "nocol.parquet")], {}, "has no column 'text' (its columns: body)"),
        "truncated zst": ([str(folder / "cut.jsonl.zst")], {}, "is a damaged zstd file"),
        "corrupt zst": ([str(folder / "garbled.jsonl.zst")], {}, "is a damaged zstd file"),
        "truncated gz": ([str(folder / "cut.jsonl.gz")], {}, "is a damaged gzip file"),
        "mixed glob": ([str(folder / "mix" / "*")], {}, "mixes formats: 1 JSON lines ("),
        "named parquet": ([str(folder / "fake.parquet")], {}, "named Parquet but its bytes are not"),
        "bzip2": ([str(folder / "x.bz2")], {}, "is a bzip2 file"),
        "llm.c length": ([str(folder / "short.bin")], {}, "header says 100 tokens"),
        "llm.c version": ([str(folder / "version.bin")], {}, "llm.c shard version 7"),
        "null text": ([str(folder / "null.jsonl")], {}, "line 1: 'text' is null, not a string"),
        "bpe of tokens": ([str(folder / "short.bin")], {"tokenizer": "bpe"}, "already tokens"),
    }


def test_every_bad_input_is_one_line_and_an_earlier_output_is_kept(tmp_path: Path) -> None:
    (tmp_path / "ok.jsonl").write_text('{"text": "kept"}\n')
    output = tmp_path / "out" / "x.bin"
    before, _ = prepared(str(tmp_path / "ok.jsonl"), output)
    for name, (inputs, options, says) in bad_inputs(tmp_path / "bad").items():
        with pytest.raises(DataError) as error:
            prepare.prepare(inputs, str(output), **options)  # type: ignore[arg-type]
        assert says in one_line(error), (name, one_line(error))
        assert np.array_equal(np.asarray(read_token_file(output)[0]), before), name  # nothing lost
        assert not list(output.parent.glob(".tmp-*")), name


def test_procs_of_zero_or_beyond_the_cores_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    for procs in ("0", str(prepare.available_cores() + 1)):
        result = subprocess.run(
            [sys.executable, "-m", "train.prepare", "--input", str(tmp_path / "a.txt"), "--output",
             str(tmp_path / "o.bin"), "--procs", procs],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"PROCS={procs} must be from 1 to the {prepare.available_cores()} cores" in result.stderr
        assert not (tmp_path / "o.bin").exists()


def test_a_datasets_dictionary_names_its_splits(tmp_path: Path) -> None:
    from datasets import DatasetDict

    split = Dataset(InMemoryTable(pa.table({"text": ["a", "b"]})), fingerprint="t")
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as error:
        prepare.prepare([str(tmp_path / "dd")], str(tmp_path / "o.bin"))
    assert "splits of a datasets DatasetDict (train, test)" in one_line(error)
    assert f"INPUT={tmp_path / 'dd' / 'train'}" in one_line(error)
    assert load_from_disk(str(tmp_path / "dd" / "train"))["text"] == ["a", "b"]
    assert prepared(str(tmp_path / "dd" / "train"), tmp_path / "t.bin")[0].tobytes() == b"a\0b\0"


# ---------------------------------------------------------------------------- llm.c shards


def reference_llmc_read(path: Path) -> np.ndarray:
    """llm.c's format, read from its description: 256 int32 (magic 20240520, version 1, count), then uint16 ids."""
    with open(path, "rb") as file:
        header = np.frombuffer(file.read(256 * 4), dtype=np.int32)
        assert header[0] == LLMC_MAGIC and header[1] == LLMC_VERSION
        tokens = np.frombuffer(file.read(), dtype=np.uint16)
    assert len(tokens) == header[2]
    return tokens


def reference_llmc_write(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def test_llmc_shards_written_by_prepare_are_read_by_a_reference_reader(tmp_path: Path) -> None:
    docs = documents(300, long_one=False)
    source = write_every_format(tmp_path / "in", docs)["jsonl"]
    plain, _ = prepared(source, tmp_path / "plain.bin", tokenizer="bpe", vocab=400)
    given = str(tmp_path / "plain.tokenizer.json")
    prepare.prepare([source], str(tmp_path / "llmc.bin"), given, shard_tokens=5000, shard_format="llmc")
    shards = sorted(tmp_path.glob("llmc.0*.bin"))
    assert len(shards) == -(-len(plain) // 5000) > 1
    assert np.array_equal(np.concatenate([reference_llmc_read(p) for p in shards]), plain)
    assert np.array_equal(np.asarray(read_token_file(tmp_path / "llmc.bin")[0]), plain)  # and by the set's name
    prepare.prepare([source], str(tmp_path / "bytes.bin"), shard_tokens=10**9, shard_format="llmc")
    expected = b"".join(doc.encode() + b"\0" for doc in docs)
    assert reference_llmc_read(tmp_path / "bytes.bin").astype(np.uint8).tobytes() == expected  # bytes as uint16


def test_llmc_shards_written_by_a_test_train_and_are_copied_by_prepare(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shards = tmp_path / "fineweb"
    shards.mkdir()
    parts = [rng.integers(0, 300, size) for size in (3000, 2000)]
    for index, part in enumerate(parts):
        reference_llmc_write(shards / f"fineweb_train_{index:06d}.bin", part)
    reference_llmc_write(shards / "fineweb_val_000000.bin", rng.integers(0, 300, 1500))
    run_dir = tmp_path / "run"
    trained = launch_train(
        run_dir, 1, 2, f"data.path={shards}/fineweb_train_*.bin", f"data.val_path={shards}/fineweb_val_*.bin",
        "model.vocab_size=auto", "train.eval_every=2", "train.eval_batches=1",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "torchrig: data: files:" in trained.stdout and metrics(run_dir)[-1]["val_loss"] > 0
    # a directory of them trains too, but not one that mixes training and validation shards
    cfg = load_config("tiny", [f"data.path={shards}"])
    with pytest.raises(DataError, match="holds training and validation shards"):
        build_dataset(cfg)
    (shards / "fineweb_val_000000.bin").unlink()
    cfg = load_config("tiny", [f"data.path={shards}", "model.vocab_size=auto", "data.seq_len=32"])
    assert cfg.model.vocab_size == 50257 and len(build_dataset(cfg)) == (5000 - 1) // 32
    # prepare copies them (never re-tokenized), and records llm.c's tokenizer
    tokens, meta = prepared(f"{shards}/*.bin", tmp_path / "copy.bin", shard_tokens=1234)
    assert np.array_equal(tokens, np.concatenate(parts)) and meta["tokenizer"]["kind"] == "gpt2"
    assert meta["vocab_size"] == 50257 and len(meta["shards"]) == 5


def test_a_wrong_llmc_header_or_length_is_one_line_where_it_is_read(tmp_path: Path) -> None:
    bad = bad_inputs(tmp_path)
    for name in ("llm.c length", "llm.c version"):
        path = bad[name][0][0]
        with pytest.raises(DataError) as error:
            build_dataset(load_config("tiny", [f"data.path={path}"]))
        assert bad[name][2] in one_line(error), name
    (tmp_path / "glob").mkdir()
    reference_llmc_write(tmp_path / "glob" / "a.bin", np.arange(100))
    (tmp_path / "glob" / "b.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(DataError, match=r"b\.bin is not an llm\.c shard"):
        build_dataset(load_config("tiny", [f"data.path={tmp_path}/glob/*.bin"]))
