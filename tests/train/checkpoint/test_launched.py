"""Checkpoints of real runs, launched as `make train` launches them (2-3 ranks, gloo, fp32): resume at another
GPU count, no save through a planted link, damaged and hand-made checkpoints refused or skipped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers.checkpoints import MakesMarkerWhenUnpickled, torch_saved
from tests.helpers.trainrun import checkpoint_state, launch_train, metrics

RUN_CKPT = ["train.ckpt_every=2", "train.lr_decay_steps=12", "train.keep_ckpts=10"]


def torchrig_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("torchrig")]


def sidecar_files(run_dir: Path, step: int) -> list[str]:
    return sorted(json.loads((run_dir / "checkpoints" / f"step-{step:06d}.json").read_text())["files"])


@pytest.mark.slow
def test_a_run_resumes_at_another_gpu_count_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 ranks x MICRO_BATCH 3 for 6 steps, then 3 ranks x MICRO_BATCH 2 to step 12 in the same RUN_DIR."""
    reference = tmp_path / "reference"
    assert launch_train(reference, 2, 12, *RUN_CKPT, "train.micro_batch=3").returncode == 0
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 6, *RUN_CKPT, "train.micro_batch=3").returncode == 0
    logged = (run_dir / "metrics.jsonl").read_text()

    refused = launch_train(run_dir, 3, 12, *RUN_CKPT, "train.micro_batch=3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = torchrig_lines(refused)
    assert "global batch 6 (world_size=2 x train.micro_batch=3" in line and "global batch 9" in line
    assert (run_dir / "metrics.jsonl").read_text() == logged

    resumed = launch_train(run_dir, 3, 12, *RUN_CKPT, "train.micro_batch=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 6" in resumed.stdout
    assert "saved by 2 ranks and this run has 3" in resumed.stderr  # what happens to the per-rank RNG
    expected = {r["step"]: r["loss"] for r in metrics(reference)}
    got = {r["step"]: r["loss"] for r in metrics(run_dir)}
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.slow
def test_a_run_never_saves_through_a_planted_symlink(tmp_path: Path) -> None:
    """Issue 10 item 2, through a real run: links at every temporary name a save used, and at summary.json."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *RUN_CKPT).returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "victim-dir").mkdir()
    ckpts = run_dir / "checkpoints"
    for name in (".tmp-step-000006.pt", ".tmp-step-000006.json"):
        (ckpts / name).symlink_to(victim)
    (ckpts / ".tmp-step-000006").symlink_to(tmp_path / "victim-dir")
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").symlink_to(victim)  # replaced by the new summary, never written through
    resumed = launch_train(run_dir, 2, 6, *RUN_CKPT)
    assert resumed.returncode == 0, resumed.stderr
    assert victim.read_text() == "untouched" and list((tmp_path / "victim-dir").iterdir()) == []
    assert not (run_dir / "summary.json").is_symlink()
    assert checkpoint_state(run_dir)[2]["step"] == 6


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_all_damaged_is_refused_and_keeps_its_records(tmp_path: Path) -> None:
    """Issue 10 item 8: not a silent restart at step 0 that duplicates the metrics rows."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *RUN_CKPT).returncode == 0
    logged = (run_dir / "metrics.jsonl").read_text()
    for step in (2, 4):
        flip_a_byte(run_dir / "checkpoints" / sidecar_files(run_dir, step)[-1])
    rerun = launch_train(run_dir, 2, 8, *RUN_CKPT)
    assert rerun.returncode == 2 and "Traceback" not in rerun.stderr, rerun.stderr
    (line,) = torchrig_lines(rerun)
    assert "step-000004, step-000002" in line and "move them away" in line and "fresh RUN_DIR" in line
    assert (run_dir / "metrics.jsonl").read_text() == logged


@pytest.mark.slow
def test_a_run_skips_a_hand_made_sidecar_and_a_hand_made_pickle_for_the_good_one(tmp_path: Path) -> None:
    """Issue 10 item 10: `"files": []`, and a re-hashed pickle with a non-allow-listed global, each skipped."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 6, *RUN_CKPT).returncode == 0
    newest = run_dir / "checkpoints" / "step-000006.json"
    newest.write_text(json.dumps({**json.loads(newest.read_text()), "files": []}))
    sidecar_path = run_dir / "checkpoints" / "step-000004.json"
    sidecar = json.loads(sidecar_path.read_text())
    marker = tmp_path / "code-ran"
    for name in [n for n in sidecar["files"] if n.endswith(".pt")]:
        hostile = torch_saved({"step": 4, "model": MakesMarkerWhenUnpickled(marker)})
        (run_dir / "checkpoints" / name).write_bytes(hostile)
        sidecar["files"][name] = {"sha256": hashlib.sha256(hostile).hexdigest(), "size": len(hostile)}
    sidecar_path.write_text(json.dumps(sidecar))
    resumed = launch_train(run_dir, 2, 8, *RUN_CKPT)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "resuming from step 2" in resumed.stdout and not marker.exists()
    warned = [line for line in resumed.stderr.splitlines() if "trying the one before" in line]
    assert len(warned) == 2 and "step-000006" in warned[0] and "step-000004" in warned[1]
