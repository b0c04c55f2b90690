"""env.common.atomic: a write is the old file or the new one, never through a planted symlink (issue 10 item 2)."""

from __future__ import annotations

import itertools
import os
import secrets
import uuid
from pathlib import Path

import pytest

from env.common import atomic


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")
    atomic.write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind


def test_a_symlink_at_the_final_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "summary.json"
    target.symlink_to(victim)
    atomic.write_text_atomically(target, "record")
    assert victim.read_text() == "untouched"
    assert not target.is_symlink() and target.read_text() == "record"


def test_a_symlink_at_the_temporary_name_cannot_redirect_the_write(tmp_path: Path, monkeypatch) -> None:
    """Fix the randomness, learn the temporary name a write uses, plant a link there: the next write avoids it."""
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=1))
    draws = itertools.cycle(["0" * 16, "1" * 16])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    target = tmp_path / "manifest.json"
    used: list[Path] = []
    real_replace = os.replace

    def spying_replace(src, dst):
        used.append(Path(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    atomic.write_text_atomically(target, "first")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    used[0].symlink_to(victim)
    draws = itertools.cycle(["0" * 16, "1" * 16])  # the same draw again: the planted name comes first
    atomic.write_text_atomically(target, "second")
    assert victim.read_text() == "untouched"
    assert target.read_text() == "second" and used[1] != used[0]


def test_an_exclusive_create_never_opens_what_is_there(tmp_path: Path) -> None:
    existing = tmp_path / "file"
    existing.write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for path in (existing, link):
        with pytest.raises(FileExistsError):
            atomic.open_exclusive(path)
    assert existing.read_text() == "kept" and not (tmp_path / "nowhere").exists()


def test_temporary_names_are_fresh_and_marked(tmp_path: Path) -> None:
    first, handle = atomic.create_exclusive(tmp_path, "x")
    handle.close()
    second = atomic.make_temp_dir(tmp_path, "x")
    assert first != second and first.name.startswith(atomic.TEMP_PREFIX) and second.is_dir()
