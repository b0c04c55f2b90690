"""NVML answers recorded on real boxes (tests/fixtures/nvml/*.json), loaded as the snapshot a live read gives."""

from __future__ import annotations

from env.machine.nvml import Snapshot
from tests.helpers.paths import FIXTURES


def box(name: str) -> Snapshot:
    """The recorded box `name`, e.g. box("box_3x4090_pcie")."""
    return Snapshot.load(FIXTURES / "nvml" / f"{name}.json")
