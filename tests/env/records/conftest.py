"""Shared by the run-record tests: no manifest ever runs the doctor's GPU load."""

from __future__ import annotations

import pytest

from env.machine import facts as machine


@pytest.fixture(autouse=True)
def _no_gpu_load(monkeypatch) -> None:
    """A manifest must never run the doctor's GPU load; make it loud if it tries."""

    def refuse(*_: object) -> None:
        raise AssertionError("write_manifest ran the GPU load")

    monkeypatch.setattr(machine, "read_snapshot_under_load", refuse)
