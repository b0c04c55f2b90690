"""make prepare at corpus scale: processes that change nothing, shards with a manifest, a SIGKILL that loses only the
shard being written, one writer per output, and the loader reading the shards as one stream."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import ROOT
from tests.helpers.trainrun import launch_train
from train import prepare
from train.config_loader import default_config
from train.data import build_dataset, read_token_file
from train.data.shards import OutputLock, SetPaths
from train.data.split import split_samples
from train.data.tokens import TokenStream, write_token_file
from train.errors import DataError

SHARD_TOKENS = 20_000


def write_jsonl(folder: Path, files: int = 6, records: int = 600) -> str:
    """Seeded JSON lines over a few files of about a unit (1 MiB) each: more units than processes."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "délta", "ε", "🙂", "token", "shard", "\n"])
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        with open(folder / f"part{index}.jsonl", "w", encoding="utf-8") as out:
            for _ in range(records):
                out.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(50, 400))))}) + "\n")
    return str(folder / "*.jsonl")


def shard_bytes(output: Path) -> list[bytes]:
    meta = json.loads(output.with_suffix(".json").read_text())
    return [(output.parent / entry["file"]).read_bytes() for entry in meta["shards"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """The corpus, a BPE trained on it, and the uninterrupted one-process prepare every other run is held to."""
    folder = tmp_path_factory.mktemp("scale")
    inputs = write_jsonl(folder / "in")
    prepare.prepare([inputs], str(folder / "bpe.bin"), "bpe", 512, shard_tokens=10**9)
    tokenizer = folder / "bpe.tokenizer.json"
    reference = folder / "reference" / "x.bin"
    prepare.prepare([inputs], str(reference), str(tokenizer), shard_tokens=SHARD_TOKENS, procs=1)
    return folder, inputs, reference


def test_one_and_four_processes_give_identical_shards(corpus: tuple[Path, str, Path]) -> None:
    folder, inputs, reference = corpus
    four = folder / "four" / "x.bin"
    manifest = prepare.prepare(
        [inputs], str(four), str(folder / "bpe.tokenizer.json"), shard_tokens=SHARD_TOKENS, procs=4
    )
    assert len(manifest["shards"]) > 3
    assert shard_bytes(four) == shard_bytes(reference)
    assert manifest["sha256"] == json.loads(reference.with_suffix(".json").read_text())["sha256"]
    whole = np.concatenate([np.frombuffer(b, np.uint16) for b in shard_bytes(reference)])
    assert all(len(b) == 2 * SHARD_TOKENS for b in shard_bytes(reference)[:-1])  # every shard full but the last
    assert manifest["count"] == len(whole) and manifest["max_token"] == int(whole.max())


def prepare_command(inputs: str, output: Path, tokenizer: Path, procs: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "train.prepare", "--input", inputs, "--output", str(output), "--tokenizer",
        str(tokenizer), "--shard-tokens", str(SHARD_TOKENS), "--procs", str(procs),
    ]  # fmt: skip


def kill_mid_prepare(command: list[str], output: Path) -> dict:
    """Start the prepare, wait until a shard is finished and the next one half written, SIGKILL it; its manifest."""
    env = {**os.environ, prepare.TEST_UNIT_SLEEP: "0.3"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            sidecar = output.with_suffix(".json")
            manifest = json.loads(sidecar.read_text()) if sidecar.exists() else {}
            partial = [p for p in output.parent.glob(".tmp-x.*.bin.*") if p.stat().st_size > 0]
            if len(manifest.get("shards", [])) >= 2 and partial:
                os.killpg(process.pid, signal.SIGKILL)  # the prepare and its tokenizer processes
                process.wait()
                return manifest
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    raise AssertionError("the prepare never had a finished shard and a half-written one")


def test_a_sigkilled_prepare_keeps_its_shards_and_a_rerun_equals_an_uninterrupted_one(
    corpus: tuple[Path, str, Path],
) -> None:
    folder, inputs, reference = corpus
    output = folder / "killed" / "x.bin"
    command = prepare_command(inputs, output, folder / "bpe.tokenizer.json")
    interrupted = kill_mid_prepare(command, output)
    assert interrupted["complete"] is False
    kept = {e["file"]: (output.parent / e["file"]).stat().st_mtime_ns for e in interrupted["shards"]}
    with pytest.raises(DataError, match="has not finished"):
        read_token_file(output)  # an unfinished set is never trained on
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed .tmp-x." in rerun.stderr  # the half-written shard, redone
    assert not list(output.parent.glob(".tmp-*"))
    assert {name: (output.parent / name).stat().st_mtime_ns for name in kept} == kept  # finished shards kept
    assert shard_bytes(output) == shard_bytes(reference)
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in (output, reference)]
    assert manifests[0] == manifests[1]  # the manifest right: shards, counts, digests, cursors, plan


def test_a_damaged_shard_is_redone_and_a_finished_set_is_left_alone(corpus: tuple[Path, str, Path]) -> None:
    folder, inputs, reference = corpus
    output = folder / "damaged" / "x.bin"
    tokenizer = str(folder / "bpe.tokenizer.json")
    prepare.prepare([inputs], str(output), tokenizer, shard_tokens=SHARD_TOKENS, procs=2)
    out = io.StringIO()
    prepare.prepare([inputs], str(output), tokenizer, shard_tokens=SHARD_TOKENS, procs=2, out=out)
    assert "already prepared" in out.getvalue()
    second = output.parent / "x.000002.bin"
    data = bytearray(second.read_bytes())
    data[100] ^= 1
    second.write_bytes(bytes(data))
    first_mtime = (output.parent / "x.000000.bin").stat().st_mtime_ns
    prepare.prepare([inputs], str(output), tokenizer, shard_tokens=SHARD_TOKENS, procs=2)
    assert shard_bytes(output) == shard_bytes(reference)
    assert (output.parent / "x.000000.bin").stat().st_mtime_ns == first_mtime


def test_another_plan_starts_afresh_and_leaves_no_stale_shards(corpus: tuple[Path, str, Path]) -> None:
    folder, inputs, _ = corpus
    output = folder / "replan" / "x.bin"
    tokenizer = str(folder / "bpe.tokenizer.json")
    many = prepare.prepare([inputs], str(output), tokenizer, shard_tokens=SHARD_TOKENS)
    one = prepare.prepare([inputs], str(output), tokenizer, shard_tokens=10**9)
    assert len(many["shards"]) > 1 and [e["file"] for e in one["shards"]] == ["x.bin"]
    assert sorted(p.name for p in output.parent.iterdir()) == [".x.bin.lock", "x.bin", "x.json", "x.tokenizer.json"]
    assert one["sha256"] == many["sha256"]  # the same ids, one file


def test_one_prepare_at_a_time_writes_an_output(corpus: tuple[Path, str, Path]) -> None:
    folder, inputs, _ = corpus
    output = folder / "busy" / "x.bin"
    output.parent.mkdir()
    holder = OutputLock(SetPaths(output))
    try:
        with pytest.raises(DataError, match=f"another make prepare \\(pid {os.getpid()}\\) is writing"):
            prepare.prepare([inputs], str(output))
    finally:
        holder.release()
    assert not output.with_suffix(".json").exists()


def test_force_says_what_it_replaces(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "x.000001.bin").write_text("a stranger's")
    with pytest.raises(DataError, match=r"x\.000001\.bin exists and was not written by prepare"):
        prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "x.bin"))
    out = io.StringIO()
    prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "x.bin"), force=True, out=out)
    assert f"FORCE=1: replacing {tmp_path / 'x.000001.bin'}, which prepare did not write" in out.getvalue()


def test_progress_shows_mb_per_second_tokens_per_second_and_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 0.0)
    out = io.StringIO()
    prepare.Progress("tokenized", 4 * 2**20, out).add(2**20, tokens=250_000)
    line = out.getvalue()
    assert "tokenized 1.0 of 4.0 MiB (25%)" in line and "MiB/s, eta" in line and "tokens/s" in line


# ---------------------------------------------------------------------------- the loader


def test_the_loader_reads_the_shards_as_one_stream_and_splits_as_before(corpus: tuple[Path, str, Path]) -> None:
    folder, _, reference = corpus
    whole = folder / "whole.bin"
    tokens, _ = read_token_file(reference)
    assert isinstance(tokens, TokenStream) and len(tokens.maps) > 3
    expected = np.concatenate([np.frombuffer(b, np.uint16) for b in shard_bytes(reference)])
    assert np.array_equal(np.asarray(tokens), expected)
    edge = SHARD_TOKENS - 5  # a slice across a shard boundary
    assert np.array_equal(tokens[edge : edge + 10], expected[edge : edge + 10]) and tokens[-1] == expected[-1]
    write_token_file(whole, [expected], vocab_size=512, tokenizer={"sha256": "0" * 64})
    splits = []
    for path, seed, micro_batch in ((reference, 1, 4), (reference, 2, 3), (whole, 3, 2)):
        cfg = default_config()
        cfg.data.source, cfg.data.path, cfg.data.seq_len = "files", str(path), 64
        cfg.model.vocab_size, cfg.train.seed, cfg.train.micro_batch = 512, seed, micro_batch
        dataset = build_dataset(cfg)
        splits.append(split_samples(dataset, cfg).val.tolist())
        start = (len(dataset) - 1) * 64  # the last sample's targets
        assert np.array_equal(dataset[len(dataset) - 1][1].numpy(), expected[start + 1 : start + 65])
    assert splits[0] == splits[1] == splits[2]  # the same held-out tail for any seed, batch or layout


def test_a_model_trains_on_a_set_of_shards(corpus: tuple[Path, str, Path]) -> None:
    folder, _, reference = corpus
    run_dir = folder / "run"
    result = launch_train(run_dir, 2, 2, f"data.path={reference}", "model.vocab_size=auto", "train.eval_every=0")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "tokenizer.json").read_bytes() == (folder / "bpe.tokenizer.json").read_bytes()


def test_planted_fifos_and_links_never_hang_nor_get_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    os.mkfifo(tmp_path / "x.json")  # a FIFO as the manifest: read without blocking, and not prepare's
    with pytest.raises(DataError, match=r"x\.json exists and was not written by prepare"):
        prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "x.bin"))
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(DataError, match="is not a regular file"):
        prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "y.bin"), str(tmp_path / "fifo.json"))
    (tmp_path / "z.tokenizer.json").symlink_to(secret)  # a link where prepare would write its tokenizer
    with pytest.raises(DataError, match=r"z\.tokenizer\.json exists and was not written by prepare"):
        prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "z.bin"), "bpe", 300)
    prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "z.bin"), "bpe", 300, force=True)
    assert secret.read_text() == "not yours" and not (tmp_path / "z.tokenizer.json").is_symlink()
    (tmp_path / "ds").mkdir()
    os.mkfifo(tmp_path / "ds" / "state.json")
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        prepare.prepare([str(tmp_path / "ds")], str(tmp_path / "w.bin"))


ABANDONED_POOL = """
import signal, sys
from train.data.encode import EncoderSpec, encoded
from train.data.formats import Unit

flag = []
signal.signal(signal.SIGTERM, lambda signum, frame: flag.append(signum))  # a trainer's kind: it only takes note
units = (Unit(file=0, origin="x", format="text", start=(0, 0)) for _ in range(100))
stream = encoded(units, EncoderSpec(kind="bytes", text_field="text", dtype="uint8"), 2)
next(stream)
stream.close()  # abandoned mid-way: the pool is terminated
print("ended", flag)
"""


def test_a_pool_abandoned_in_a_process_whose_sigterm_handler_only_takes_note_still_ends() -> None:
    # The processes are forked: they inherit the handler, and used to stay deaf to the pool's SIGTERM forever.
    ended = subprocess.run(
        [sys.executable, "-c", ABANDONED_POOL], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.strip() == "ended []"  # the parent's own handler never fired
