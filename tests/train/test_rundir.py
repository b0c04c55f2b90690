"""What a RUN_DIR already holds (train/rundir.py): a finished run's step count and the earlier metrics rows,
read safely from hostile files."""

from __future__ import annotations

import json

import pytest

from train.rundir import completed_steps, earlier_records

# Slow, as when they were part of the RUN_DIR tests through make (tests/e2e/test_run_dir.py).
pytestmark = pytest.mark.slow


def test_completion_and_history_read_hostile_files_safely(tmp_path) -> None:
    (tmp_path / "summary.json").write_bytes(b"\xff\xfe not json")
    assert completed_steps(tmp_path, 4) is None
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "stopped_early": True}))
    assert completed_steps(tmp_path, 4) is None  # stopped by SIGTERM: a rerun continues it
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "stopped_early": False}))
    assert completed_steps(tmp_path, 4) == 4 and completed_steps(tmp_path, 5) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n[1]\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert [r["step"] for r in earlier_records(tmp_path, 2)] == [1, 2]
    # Links to endless devices read as absent, and do not hang the reader.
    for name in ("summary.json", "metrics.jsonl"):
        (tmp_path / name).unlink()
        (tmp_path / name).symlink_to("/dev/zero")
    assert completed_steps(tmp_path, 4) is None and earlier_records(tmp_path, 2) == []
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").write_bytes(b"x" * 200_000 + b'\n{"step": 1, "loss": 3.0}\n')  # one row too long
    assert [r["step"] for r in earlier_records(tmp_path, 2)] == [1]
