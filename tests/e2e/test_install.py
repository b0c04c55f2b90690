"""torchrig installs as a package: `pip install .` from a clean clone, `pip install -e .` in a used checkout.

Each install goes into a fresh venv whose dependencies are those of the environment running the tests
(a .pth file adds its site-packages), so nothing is downloaded: pip runs with --no-deps, --no-index and
--no-build-isolation (setuptools comes from the lock). The clone holds what is committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        command, cwd=cwd, env={**environ, **env}, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


def fresh_venv(where: Path) -> Path:
    """A new venv that sees this environment's packages through a .pth file; its python."""
    _run([sys.executable, "-m", "venv", str(where)], where.parent)
    python = where / "bin" / "python"
    # A venv of Python < 3.12 gets its own setuptools, too old to build a wheel without `wheel`: the lock's wins.
    _run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"], where.parent)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], where).stdout
    (Path(purelib.strip()) / "torchrig-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: Path, *args: str) -> None:
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", "--no-index", "--no-build-isolation", *args], python.parent)


def imported_from(python: Path, cwd: Path) -> list[Path]:
    code = "import env, train; print(env.__file__); print(train.__file__)"
    return [Path(line).resolve() for line in _run([str(python), "-c", code], cwd).stdout.split()]


def test_pip_install_from_a_clean_clone_gives_the_console_script(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    _run(["git", "clone", "--quiet", str(ROOT), str(clone)], tmp_path)
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, str(clone))
    elsewhere = tmp_path / "elsewhere"  # not the checkout: train and env must come from the install
    elsewhere.mkdir()
    assert all((tmp_path / "venv").resolve() in path.parents for path in imported_from(python, elsewhere))
    torchrig = tmp_path / "venv" / "bin" / "torchrig"
    listed = _run([str(torchrig), "--help"], elsewhere).stdout
    assert "train" in listed and "nccl-test" in listed

    run_dir = tmp_path / "run"
    _run([str(torchrig), "train", "--steps", "2", "--run-dir", str(run_dir)], elsewhere, OMP_NUM_THREADS="1")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]


def test_pip_install_editable_in_a_used_checkout(tmp_path: Path) -> None:
    """runs/, data/, checkpoints/ and .build/ beside train/ and env/ are not packages, and are left alone."""
    clone = tmp_path / "clone"
    _run(["git", "clone", "--quiet", str(ROOT), str(clone)], tmp_path)
    for folder in ("runs/tiny-1", "data", "checkpoints", ".build/dev-venv"):
        (clone / folder).mkdir(parents=True)
    (clone / "data" / "corpus.bin").write_bytes(b"\0" * 8)
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "--editable", str(clone))
    expected = [(clone / "env" / "__init__.py").resolve(), (clone / "train" / "__init__.py").resolve()]
    assert imported_from(python, tmp_path) == expected
    assert "train" in _run([str(tmp_path / "venv" / "bin" / "torchrig"), "--help"], tmp_path).stdout
    untracked = _run(["git", "status", "--porcelain"], clone).stdout
    assert untracked == "", untracked  # the install's own files (torchrig.egg-info) are ignored
