"""File records and the sidecar: a truncated, corrupted, unlisted or hand-edited checkpoint is skipped
for the one before, with one warning line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.checkpoints import (
    load_fresh,
    make_checkpointer,
    make_optimizer,
    save_trained,
    tensor_file,
    tiny_model,
    warnings_in,
)


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tensor_file(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:-100])
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "truncated" in line and "\n" not in line


def test_corrupted_bytes_of_the_same_size_are_caught_by_the_checksum(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tensor_file(tmp_path, 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "sha256" in line


def test_checkpoint_without_sidecar_is_incomplete_and_skipped(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000002.json").unlink()
    model = tiny_model()
    assert make_checkpointer(tmp_path, model, make_optimizer(model)).latest_step() == 1
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "incomplete" in line


def edit_sidecar_files(files: object) -> object:
    return lambda sidecar: {**sidecar, "files": files}


SIDECAR_EDITS = {
    # Issue 10 item 10: a sidecar is input too; each of these once crashed the resume or read a file unverified.
    "files is an empty list": (edit_sidecar_files([]), "lists no files"),
    "files is empty": (edit_sidecar_files({}), "lists no files"),
    "a file left out": (lambda s: {**s, "files": dict(list(s["files"].items())[1:])}, "is not in its sidecar"),
    "a name outside the entry": (
        lambda s: {**s, "files": {"../../victim": next(iter(s["files"].values()))}},
        "which is not a file of step-000002",
    ),
    "a malformed record": (lambda s: {**s, "files": {k: {"sha256": 1} for k in s["files"]}}, "malformed record"),
    "not an object": (lambda s: [s], "names no format"),
    "nested too deep": (None, "unreadable"),
}


@pytest.mark.parametrize("kind", SIDECAR_EDITS)
def test_a_hand_made_sidecar_is_skipped_for_the_one_before(tmp_path: Path, caplog, kind: str) -> None:
    save_trained(tmp_path, [1, 2])
    sidecar = tmp_path / "checkpoints" / "step-000002.json"
    edit, expected = SIDECAR_EDITS[kind]
    sidecar.write_text(json.dumps(edit(json.loads(sidecar.read_text()))) if edit else "[" * 100_000)
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and expected in line and "\n" not in line
