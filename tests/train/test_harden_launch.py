"""Issue 16 class 9: worker arguments never pass through torch elastic's `$`-templates.

`make train RUN_DIR='runs/d$$e'` locked and announced `d$$e` but the workers wrote into `d$e`;
`RUN_DIR='x${local_rank}y'` trained into `x0y`: the agent runs every worker argument through
string.Template.safe_substitute(local_rank=...). No value may change between launcher and worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from env.rig.launch import worker_argv
from tests.helpers.trainrun import launch_train

HOSTILE = ["runs/d$$e", "x${local_rank}y", "$local_rank", "$", "$$$", "${", "a$b$$c${d}e", "plain", "--run-dir=$HOME"]


def test_every_argument_survives_the_agents_substitution_on_every_rank() -> None:
    from torch.distributed.elastic.utils.api import macros

    for rank in ("0", "1", "7"):
        assert list(macros.substitute(worker_argv(HOSTILE), rank)) == HOSTILE


@pytest.mark.parametrize("name", ["d$$e", "x${local_rank}y"])
def test_a_run_trains_in_the_directory_it_was_given(tmp_path: Path, name: str) -> None:
    run_dir = tmp_path / name
    result = launch_train(run_dir, 2, 1)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "checkpoints" / "step-000001.json").exists() and (run_dir / "metrics.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no d$e, no x0y, x1y beside it
