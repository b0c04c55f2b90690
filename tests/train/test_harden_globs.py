"""Issue 16 class 6: globs never follow links to directories, and each real file counts once.

`INPUT='loop/**/*.txt'` with `loop/self -> .` counted one file 41 times (into the training data and
the validation tail); two such links, or a glob through /proc, walked exponentially. The walk is
measured by the directories it lists, not by time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import alarm_after
from train.data.text import expand_globs
from train.errors import DataError


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """An exponential walk fails the test after 60 s instead of running for hours."""
    with alarm_after(60, "the glob walk did not end: it follows directory links"):
        yield


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every directory the walk lists, in order (os.scandir is how both glob and ours list one)."""
    listed: list[str] = []
    real = os.scandir

    def scandir(path: object = ".") -> object:
        listed.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return listed


def tree(root: Path) -> Path:
    loop = root / "loop"
    (loop / "sub" / "deeper").mkdir(parents=True)
    (loop / "a.txt").write_text("a")
    (loop / "sub" / "b.txt").write_text("b")
    (loop / "sub" / "deeper" / "c.txt").write_text("c")
    return loop


def test_a_link_loop_counts_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = tree(tmp_path)
    (loop / "self").symlink_to(".")
    monkeypatch.chdir(tmp_path)
    files = expand_globs(["loop/**/*.txt"], "INPUT", "fix")
    assert [str(p) for p in files] == ["loop/a.txt", "loop/sub/b.txt", "loop/sub/deeper/c.txt"]


def test_two_loops_and_several_stars_walk_each_directory_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listings: list[str]
) -> None:
    loop = tree(tmp_path)
    (loop / "self").symlink_to(".")
    (loop / "sub" / "up").symlink_to("..")
    (loop / "sub" / "deeper" / "root").symlink_to("/")
    monkeypatch.chdir(tmp_path)
    files = expand_globs(["loop/**/**/*.txt", "loop/**/*.txt"], "INPUT", "fix")
    assert len(files) == 3
    real_dirs = 3  # loop, loop/sub, loop/sub/deeper
    # Each real directory is listed at most once per pattern part that can stand there (4 parts, 2 patterns).
    assert len(listings) <= real_dirs * 4 * 2, listings
    assert not any("root" in path.split(os.sep) or "self" in path.split(os.sep) for path in listings)


def test_a_file_reached_through_several_names_counts_once(tmp_path: Path) -> None:
    loop = tree(tmp_path)
    (loop / "again.txt").symlink_to(loop / "a.txt")
    os.link(loop / "sub" / "b.txt", loop / "b-hardlink.txt")
    files = expand_globs([f"{loop}/*.txt", f"{loop}/**/*.txt", f"{loop}/a.txt"], "INPUT", "fix")
    assert [p.name for p in files] == ["a.txt", "b-hardlink.txt", "c.txt"]


def test_a_directory_named_in_full_is_followed_and_hidden_files_stay_out(tmp_path: Path) -> None:
    loop = tree(tmp_path)
    (tmp_path / "named").symlink_to(loop / "sub")
    (loop / ".hidden.txt").write_text("h")
    assert [p.name for p in expand_globs([f"{tmp_path}/named/*.txt"], "INPUT", "fix")] == ["b.txt"]
    assert ".hidden.txt" not in [p.name for p in expand_globs([f"{loop}/*.txt"], "INPUT", "fix")]
    assert [p.name for p in expand_globs([f"{loop}/.*.txt"], "INPUT", "fix")] == [".hidden.txt"]


def test_only_regular_files_match(tmp_path: Path) -> None:
    loop = tree(tmp_path)
    os.mkfifo(loop / "pipe.txt")
    (loop / "zero.txt").symlink_to("/dev/zero")
    (loop / "dir.txt").mkdir()
    assert [p.name for p in expand_globs([f"{loop}/*.txt"], "INPUT", "fix")] == ["a.txt"]


def test_a_glob_through_proc_ends_without_entering_its_links(listings: list[str]) -> None:
    with pytest.raises(DataError):  # /proc's files are of size 0 or hold no .nothing files: either is one line
        expand_globs(["/proc/self/**/*.nothing"], "INPUT", "fix")
    assert not any(part in ("root", "cwd", "exe") for path in listings for part in path.split(os.sep))


def test_a_tree_thousands_of_directories_deep_is_walked_without_recursion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the hostile pass on this change: the first walk recursed once per level."""
    deep = tmp_path / "deep"
    deep.mkdir()
    monkeypatch.chdir(deep)  # restored after the test; a relative mkdir per level keeps under PATH_MAX
    for _ in range(1500):
        os.mkdir("d")
        os.chdir("d")
    Path("x.txt").write_text("x")
    os.chdir(tmp_path)
    (deep / "top.txt").write_text("t")
    try:
        assert sorted(p.name for p in expand_globs([f"{deep}/**/*.txt"], "INPUT", "fix")) == ["top.txt", "x.txt"]
        assert len(expand_globs([f"{deep}/**"], "INPUT", "fix")) == 2  # a trailing ** takes the files below
    finally:  # shutil.rmtree (pytest's cleanup of old temporary folders) recurses per level: rm does not
        subprocess.run(["rm", "-rf", str(deep)], check=True)
