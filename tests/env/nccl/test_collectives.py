"""nccl-test's collectives table (env/nccl/collectives.py): bus-bandwidth factors, element counts, percentiles,
and expected results that agree with each collective's definition."""

from __future__ import annotations

import pytest
import torch

from env.nccl.collectives import COLLECTIVES, DTYPES, element_count, pattern, percentile, summed


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_busbw_factors_are_nccl_tests(ranks: int):
    n = ranks
    expected = {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "broadcast": 1.0,
    }
    assert {name: row.busbw_factor(n) for name, row in COLLECTIVES.items()} == pytest.approx(expected)


def test_sharded_ops_round_counts_to_whole_chunks():
    for world in (2, 3, 7):
        for size in (1, 8, 1000, 4096):
            for row in COLLECTIVES.values():
                count = element_count(row, size, 4, world)
                assert count >= 1
                if row.sharded:
                    assert count % world == 0 and count >= world


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile([7.0], 99) == 7.0


def simulate(name: str, sends: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """What each rank receives, straight from the definition of each collective."""
    if name == "all_reduce":
        return [sum(sends)] * world
    if name == "all_gather":
        return [torch.cat(sends)] * world
    if name == "reduce_scatter":
        return list(sum(sends).chunk(world))
    if name == "all_to_all":
        return [torch.cat([sends[q].chunk(world)[r] for q in range(world)]) for r in range(world)]
    return [sends[COLLECTIVES[name].root]] * world  # broadcast


@pytest.mark.parametrize("name", list(COLLECTIVES))
@pytest.mark.parametrize("world", [2, 3])
def test_expected_results_match_the_collective(name: str, world: int):
    row = COLLECTIVES[name]
    count = element_count(row, 4 * 250, 4, world)
    like = torch.empty(0)
    sends = []
    for rank in range(world):
        data = row.send_input(count, rank, world, torch.empty(row.send_elems(count, world)))
        sends.append(data if data is not None else pattern(0, count, row.root, world, like))
    received = simulate(name, sends, world)
    for rank in range(world):
        assert received[rank].numel() == row.recv_elems(count, world)
        for offset, piece in row.expected(count, rank, world, like):
            assert torch.equal(received[rank][offset : offset + piece.numel()], piece)
    # and a shifted result would be caught
    shifted = received[0].roll(1)
    assert any(not torch.equal(shifted[o : o + p.numel()], p) for o, p in row.expected(count, 0, world, like))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sums_are_exact_in_every_dtype(dtype: str):
    world = 8
    like = torch.empty(0, dtype=DTYPES[dtype].torch_dtype)
    exact = sum(pattern(0, 5000, rank, world, torch.empty(0, dtype=torch.int64)) for rank in range(world))
    assert torch.equal(summed(0, 5000, world, like).to(torch.int64), exact)
    ranks = [pattern(0, 5000, rank, world, like) for rank in range(world)]
    assert not torch.equal(ranks[0], ranks[1])  # ranks send different data
