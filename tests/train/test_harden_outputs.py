"""Issue 16 classes 1 and 3: what is copied into an output, and owning an output while it is written.

Class 1: `make export` copied RUN_DIR/tokenizer.json when it was a link to any file the runner could
read (a mode-0600 secret came out world-readable). Nothing copied into an output may be a symlink or
anything but a regular file, and a tokenizer is parsed before it is copied.
Class 3: two exports into one OUTPUT both exited 0 (one lost, or weights beside the other's config);
FORCE=1 removed a tokenizer.json without saying so; a SIGKILLed prepare left `.tmp-x.bin.<hex>` that
no rerun removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.sampling import save_checkpoint, small_config, trained_in_process
from train.export import export
from train.tokenizer import train_bpe


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = small_config()
    run_dir = tmp_path_factory.mktemp("run")
    save_checkpoint(run_dir, trained_in_process(cfg), cfg, step=2)
    return run_dir


def tokenizer_text() -> str:
    return train_bpe(["def f(x):\n    return x + 1\n" * 50], 300).to_str()


# ---------------------------------------------------------------------------- class 1: copies


def test_a_tokenizer_that_is_a_link_to_a_secret_is_never_copied(run: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(tokenizer_text())  # even a valid tokenizer: a link is refused, whatever it points at
    secret.chmod(0o600)
    (run / "tokenizer.json").symlink_to(secret)
    try:
        with pytest.raises(Exception, match="is a symlink, which is never copied out") as caught:
            export(run, tmp_path / "out")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out" / "tokenizer.json").exists()
    finally:
        (run / "tokenizer.json").unlink()


def test_a_tokenizer_that_is_not_one_is_refused_before_it_is_copied(run: Path, tmp_path: Path) -> None:
    (run / "tokenizer.json").write_text("AWS_SECRET_ACCESS_KEY=abc\n")
    try:
        with pytest.raises(Exception, match=r"not a tokenizer\.json|not valid JSON"):
            export(run, tmp_path / "out")
        assert not (tmp_path / "out" / "tokenizer.json").exists()
    finally:
        (run / "tokenizer.json").unlink()


def test_a_real_tokenizer_is_copied_as_the_bytes_that_were_parsed(run: Path, tmp_path: Path) -> None:
    (run / "tokenizer.json").write_text(tokenizer_text())
    try:
        done = export(run, tmp_path / "out")
        assert "tokenizer.json" in done["files"]
        out = tmp_path / "out" / "tokenizer.json"
        assert json.loads(out.read_text()) == json.loads((run / "tokenizer.json").read_text())
        assert not out.is_symlink()
    finally:
        (run / "tokenizer.json").unlink()


# ---------------------------------------------------------------------------- class 3: the lock


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    from env.common import outputs
    from env.common.outputs import OutputBusy, OutputLock

    target = tmp_path / "out"
    with OutputLock(target, "OUTPUT"):
        with pytest.raises(
            OutputBusy, match=rf"OUTPUT {target} is being written by another process \(pid {os.getpid()}"
        ):
            OutputLock(target, "OUTPUT").acquire()
        assert outputs.lock_path(target).exists()
    assert not outputs.lock_path(target).exists()  # removed on release: no litter beside the output
    OutputLock(target).acquire().release()


def test_an_export_into_an_output_being_written_is_refused_and_changes_nothing(run: Path, tmp_path: Path) -> None:
    from env.common.outputs import OutputBusy, OutputLock

    out = tmp_path / "out"
    export(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with OutputLock(out, "OUTPUT"), pytest.raises(OutputBusy, match="being written by another process"):
        export(run, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_two_exports_at_once_one_wins_and_the_other_says_so(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "train.export", "--run-dir", str(run), "--output", str(out), "--force"]
    jobs = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    codes = sorted(code for code, _ in results)
    # Either they ran one after the other (both 0), or one was refused in one line; never both writing.
    assert codes in ([0, 0], [0, 2]), results
    refused = [err for code, err in results if code == 2]
    assert all("being written by another process" in err for err in refused), refused
    provenance = json.loads((out / "torchrig.json").read_text())
    assert provenance["source"]["step"] == 2
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}


def test_force_says_what_it_replaced_and_removed(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_text("{}")  # a stale shard of an earlier export: ours
    (out / "notes.txt").write_text("mine")
    done = export(run, out, force=True)
    assert "removed model-00001-of-00009.safetensors" in done["changes"]
    assert not any(change.startswith("replaced") for change in done["changes"])
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "model-00001-of-00009.safetensors" not in names
    assert (out / "notes.txt").read_text() == "mine"
    result = subprocess.run(
        [sys.executable, "-m", "train.export", "--run-dir", str(run), "--output", str(out), "--force"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "FORCE=1 replaced config.json" in result.stdout, result.stdout


# ---------------------------------------------------------------------------- class 3: publishing a directory


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_publish_dir_swaps_in_the_new_folder_keeping_what_is_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    from env.common import outputs
    from env.common.outputs import publish_dir, stage_dir

    if swap == "two renames":
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    for name, text in (("weights", "old"), ("config", "old"), ("stale", "old"), ("notes.txt", "mine")):
        (target / name).write_text(text)
    staging = stage_dir(target)
    (staging / "weights").write_text("new")
    (staging / "config").write_text("new")
    published = publish_dir(staging, target, keep=lambda name: name == "notes.txt")
    assert published.replaced == ["config", "weights"] and published.removed == ["stale"]
    assert published.kept == ["notes.txt"]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"weights": "new", "config": "new", "notes.txt": "mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left


def test_publish_dir_into_a_new_target_is_one_rename(tmp_path: Path) -> None:
    from env.common.outputs import publish_dir, stage_dir

    target = tmp_path / "new"
    staging = stage_dir(target)
    (staging / "f").write_text("x")
    assert publish_dir(staging, target).removed == []
    assert (target / "f").read_text() == "x" and not staging.exists()


# ---------------------------------------------------------------------------- class 3: leftovers


def test_only_a_dead_writers_own_temporaries_are_removed(tmp_path: Path) -> None:
    from env.common.outputs import remove_leftovers

    ours = [".tmp-x.bin.0123456789abcdef", ".tmp-x.json.fedcba9876543210"]
    theirs = [".tmp-y.bin.0123456789abcdef", ".tmp-x.bin.short", "x.bin", ".tmp-x.bin.0123456789abcdef.more"]
    for name in ours + theirs:
        (tmp_path / name).write_text("")
    (tmp_path / ".tmp-x.tokenizer.json.00112233445566ff").mkdir()
    removed = remove_leftovers(tmp_path, ["x.bin", "x.json", "x.tokenizer.json"])
    assert sorted(removed) == sorted([*ours, ".tmp-x.tokenizer.json.00112233445566ff"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_a_sigkilled_prepare_leaves_temporaries_that_the_rerun_removes(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.mkdir()
    for i in range(8):
        (text / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * 40_000)
    output = tmp_path / "data" / "x.bin"
    command = [sys.executable, "-m", "train.prepare", "--input", str(text / "*.txt"), "--output", str(output)]
    job = subprocess.Popen([*command, "--tokenizer", "bpe", "--vocab", "300"], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not list(output.parent.glob(".tmp-x.bin.*")) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        left = list(output.parent.glob(".tmp-x.bin.*"))
        if not left:
            pytest.skip("prepare finished before it could be killed mid-write on this machine")
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert list(output.parent.glob(".tmp-x.bin.*")), "the kill left no temporary: nothing to test"
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(output.parent.glob(".tmp-*")), list(output.parent.iterdir())
    assert sorted(p.name for p in output.parent.iterdir()) == ["x.bin", "x.json"]


def test_an_output_that_is_a_symlink_is_refused_not_replaced(run: Path, tmp_path: Path) -> None:
    """Found by the hostile pass on this change: the one-rename publish would have replaced the link."""
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(Exception, match=r"OUTPUT=.*linked is a symlink; give the directory itself"):
        export(run, tmp_path / "linked")
    assert (tmp_path / "linked").is_symlink() and list((tmp_path / "real").iterdir()) == []
