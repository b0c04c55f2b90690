"""The make dispatcher (env/rig/runtime.py): the RUNTIME value, each target's command line from the make variables,
and the venv it makes, refused before pip starts on a disk too full for it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from env.common.cli import UserError
from env.rig.runtime import TARGETS, build_argv
from tests.helpers.commands import run

PY = sys.executable


def test_unknown_runtime_is_one_line() -> None:
    result = run([PY, "-m", "env.rig.runtime", "train", "RUNTIME=podman"])
    assert result.returncode == 2 and result.stderr.strip() == "torchrig make: RUNTIME=podman is not docker or local"


def _fake_disk(monkeypatch, tmp_path, free_bytes: float) -> list[list[str]]:
    """env.rig.runtime rooted in tmp_path (no .venv yet), a disk with free_bytes, and a record of commands run."""
    import collections

    import env.rig.runtime as runtime

    monkeypatch.setattr(runtime, "ROOT", tmp_path)
    monkeypatch.setattr(runtime, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(runtime, "STAMP", tmp_path / ".venv" / "stamp")
    monkeypatch.setattr(runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: usage(100e9, 100e9 - free_bytes, free_bytes))
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        ran.append(cmd)  # making the venv works; pip fails
        return subprocess.CompletedProcess(cmd, 1 if "pip" in cmd else 0)

    monkeypatch.setattr(runtime.subprocess, "run", fake_run)
    return ran


def test_a_disk_too_full_for_the_venv_is_refused_before_pip_starts(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=6e9)
    with pytest.raises(UserError) as err:
        runtime.ensure_venv()
    # The venv and pip's downloads share this disk: 5.5 + 3.0 GB are needed and 6 GB is not enough.
    assert "needs about 8.5 GB free" in str(err.value) and "has 6.0 GB" in str(err.value)
    assert "pip cache purge" in str(err.value) and "\n" not in str(err.value)
    assert ran == [] and not (tmp_path / ".venv").exists()


def test_a_disk_that_fills_during_the_install_is_named(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=9e9)
    runtime.check_disk_for_venv()  # enough room to start
    monkeypatch.setattr(runtime, "check_disk_for_venv", lambda: None)
    full = runtime.shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: full)  # pip then fills the disk
    with pytest.raises(UserError, match=r"filled up while installing \.venv"):
        runtime.ensure_venv()
    assert ran and "pip" in ran[-1]
    assert not (tmp_path / ".venv" / "stamp").exists()  # the next make remakes the venv


def test_a_lock_update_of_an_existing_venv_skips_the_first_install_disk_check(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=2e9)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()  # made before; its stamp names an older lock
    with pytest.raises(UserError, match="see pip's message above"):  # the fake pip fails, with room left
        runtime.ensure_venv()
    assert len(ran) == 1 and "pip" in ran[0]


def test_make_passes_the_new_variables() -> None:
    prepare = build_argv(TARGETS["prepare"], {"INPUT": "a/*.txt", "OUTPUT": "x.bin", "TOKENIZER": "bpe",
                                              "VOCAB": "512", "FORCE": "1"}, None)  # fmt: skip
    # --flag=value, so that a value starting with '-' stays a value; FORCE=1 is the bare switch
    assert prepare[3:] == ["--input=a/*.txt", "--output=x.bin", "--tokenizer=bpe", "--vocab=512", "--force"]
    evaluate = build_argv(TARGETS["eval"], {"RUN_DIR": "runs/r", "DATA": "d.bin"}, 2)
    assert evaluate[3:] == ["--gpus=2", "--run-dir=runs/r", "--data=d.bin"]


def test_a_second_make_waits_for_the_venv_another_is_making_instead_of_installing_over_it(
    monkeypatch, tmp_path, capfd
) -> None:
    import fcntl
    import os
    import threading

    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=100e9)
    (tmp_path / ".build").mkdir()
    holder = os.open(tmp_path / ".build" / "venv.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the first make, installing
    made: list[object] = []
    second = threading.Thread(target=lambda: made.append(runtime.ensure_venv()))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive() and ran == []  # waiting: no venv, no pip of its own
    (tmp_path / ".venv" / "bin").mkdir(parents=True)  # the first make finishes its install
    (tmp_path / ".venv" / "bin" / "python").touch()
    (tmp_path / ".venv" / "stamp").write_text(runtime._lock_digest())
    os.close(holder)
    second.join(timeout=60)
    assert made == [tmp_path / ".venv" / "bin" / "python"] and ran == []
    assert "another make is making .venv (it holds " in capfd.readouterr().out


def test_a_planted_link_as_the_venv_lock_is_one_line(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    _fake_disk(monkeypatch, tmp_path, free_bytes=100e9)
    (tmp_path / ".build").mkdir()
    (tmp_path / ".build" / "venv.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"cannot open make's lock .*venv\.lock .*remove it: it is a link"):
        runtime.ensure_venv()
    assert not (tmp_path / "elsewhere").exists()


def test_a_build_folder_that_is_a_file_is_named_not_its_lock(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    _fake_disk(monkeypatch, tmp_path, free_bytes=100e9)
    (tmp_path / ".build").write_text("mine")
    with pytest.raises(UserError, match=r"cannot make .*\.build for make's lock .*remove it if it is not a directory"):
        runtime.ensure_venv()
    assert (tmp_path / ".build").read_text() == "mine"
