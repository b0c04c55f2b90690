"""Multi-node through torchrun's static rendezvous: two launchers on loopback act as two nodes."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers.gloo import free_port
from tests.helpers.paths import ROOT
from tests.helpers.trainrun import launch_train, losses, train_command

pytestmark = pytest.mark.slow


def test_two_nodes_of_one_gpu_train_like_one_node_of_two(tmp_path) -> None:
    single = tmp_path / "single"
    assert launch_train(single, 2, 4).returncode == 0

    shared = tmp_path / "shared"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *train_command(shared, 1, 4),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert losses(shared) == pytest.approx(losses(single), rel=1e-6)
    assert (shared / "manifest.json").exists()  # written once, by node 0
