"""Issue 16 class 8: make eval is a reader, not training's setup.

After the README's "resume at another GPU count" make eval refused forever (the first launch's
micro_batch times the newest checkpoint's world size, and no MICRO_BATCH); GPUS=2 on a 1-process
checkpoint was refused; a read-only RUN_DIR was refused; a ResNet run was an AttributeError; a
SIGKILL of its launcher left the worker running (it then rewrote eval.json); a second eval overwrote
eval.json silently. eval now reads any run it can read, with any GPU count, tied to its launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.processes import alive, children
from tests.helpers.trainrun import launch_train, metrics

EVAL = ["train.eval_every=2", "train.eval_batches=3", "train.ckpt_every=2", "train.keep_ckpts=3"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps on 1 process at MICRO_BATCH=4, then resumed to 4 steps on 2 processes at MICRO_BATCH=2."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    first = launch_train(run_dir, 1, 2, "train.micro_batch=4", *EVAL)
    assert first.returncode == 0, first.stderr
    second = launch_train(run_dir, 2, 4, "train.micro_batch=2", *EVAL)
    assert second.returncode == 0, second.stderr
    return run_dir


def make_eval(run_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.eval", "--run-dir", str(run_dir), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def logged_val_loss(run_dir: Path, step: int) -> float:
    return next(r["val_loss"] for r in metrics(run_dir) if r["step"] == step and "val_loss" in r)


@pytest.mark.parametrize("args", [[], ["--gpus", "1"], ["--gpus", "2"], ["--gpus", "3", "--micro-batch", "1"]])
def test_eval_after_a_resume_at_another_gpu_count_gives_trainings_figure(resumed: Path, args: list[str]) -> None:
    result = make_eval(resumed, *args)
    assert result.returncode == 0, result.stderr
    record = json.loads((resumed / "eval.json").read_text())
    # Training's evaluation at step 4 read 3 batches of 2 processes x 2 samples: so does make eval, at any GPUS.
    assert record["step"] == 4 and record["samples"] == 3 * 2 * 2
    assert record["val_loss"] == pytest.approx(logged_val_loss(resumed, 4), rel=1e-6)


def test_a_second_eval_keeps_the_first_as_eval_time_json(resumed: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(resumed, run)
    for old in run.glob("eval*.json"):
        old.unlink()
    data = tmp_path / "other.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 100)
    assert make_eval(run).returncode == 0
    first = (run / "eval.json").read_text()
    second = make_eval(run, "--data", str(data))
    assert second.returncode == 0, second.stderr
    kept = sorted(run.glob("eval-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first and f"previous one kept as {kept[0].name}" in second.stdout
    assert json.loads((run / "eval.json").read_text())["data"] == str(data)


def test_a_read_only_run_directory_is_evaluated_and_the_figures_printed(resumed: Path, tmp_path: Path) -> None:
    """RUN_DIR on a read-only mount (a bind mount in a private mount namespace: read-only for root too)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private read-only mount")
    source, mounted = tmp_path / "run", tmp_path / "mounted"
    shutil.copytree(resumed, source)
    for old in source.glob("eval*.json"):
        old.unlink()
    mounted.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m needs CAP_SYS_ADMIN)")
    eval_command = shlex.join([sys.executable, "-m", "train.eval", "--run-dir", str(mounted)])
    script = (
        f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(mounted))} && "
        f"mount -o remount,ro,bind {shlex.quote(str(mounted))} && exec {eval_command}"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "val_loss" in result.stdout and "not written to" in result.stdout and "figures are above" in result.stdout
    assert not (source / "eval.json").exists()


def test_a_killed_eval_launcher_takes_its_workers_along(resumed: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(resumed, run)
    for old in run.glob("eval*.json"):
        old.unlink()
    job = subprocess.Popen(
        [sys.executable, "-m", "train.eval", "--run-dir", str(run), "--gpus", "2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and job.poll() is None:
            workers = [pid for pid in children(job.pid) if b"train.eval" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            time.sleep(0.05)
        if len(workers) < 2:
            pytest.skip("the evaluation ended before its workers could be seen")
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        deadline = time.monotonic() + 120  # generous: the assertion is that they end, not how fast
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(alive(pid) for pid in workers), "eval workers outlived their launcher"
        assert not (run / "eval.json").exists(), "an orphaned worker wrote eval.json"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_data_for_an_image_run_is_one_line_not_an_attribute_error(tmp_path: Path) -> None:
    from train.config_loader import load_config
    from train.eval import EvalError, _data_dataset
    from train.tokenizer import ANY

    cfg = load_config("resnet50", ["model.num_classes=4", "model.image_size=32"])
    with pytest.raises(EvalError, match="classifies images; make eval evaluates it on its validation split"):
        _data_dataset(cfg, str(tmp_path / "x.txt"), ANY, None)


def test_datas_errors_are_in_evals_own_words(tmp_path: Path) -> None:
    from tests.helpers.sampling import small_config
    from train.errors import DataError
    from train.eval import EvalError, _data_dataset
    from train.tokenizer import BYTES

    cfg = small_config()
    with pytest.raises(DataError) as missing:
        _data_dataset(cfg, str(tmp_path / "none.bin"), BYTES, None)
    assert str(missing.value).startswith(f"DATA='{tmp_path / 'none.bin'}' does not exist")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(EvalError) as short:
        _data_dataset(cfg, str(tmp_path / "short.txt"), BYTES, None)
    assert "fewer than one sample" in str(short.value) and "lower data.seq_len" not in str(short.value)
    for words in (missing, short):
        assert "data.path" not in str(words.value) and "TOKENIZER=" not in str(words.value)


def test_an_export_given_as_run_dir_is_named_as_one(tmp_path: Path) -> None:
    """Found by the hostile pass on this change: it was told to train first."""
    from tests.helpers.sampling import small_config, trained_in_process, write_export

    cfg = small_config()
    write_export(tmp_path, trained_in_process(cfg, steps=0), cfg.to_dict()["model"])
    result = make_eval(tmp_path)
    assert result.returncode == 2 and "holds weights without a validation split; give DATA=" in result.stderr
    assert "train first" not in result.stderr
