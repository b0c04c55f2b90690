"""The collectives as a table, and the harness that times them and checks every element.

As in nccl-tests (a shared harness plus one small definition per collective), each row says
how large its buffers are, what each rank sends, how to run it with torch.distributed, what
each rank must receive, and its bus-bandwidth factor; the harness never branches on a name.

Inputs are small integers, so every summation order gives the exact same sum in fp32, fp16 and
bf16: a wrong element is a fault, never rounding. Output buffers are pre-filled with a
sentinel that no valid result equals, so a collective that writes nothing is caught too.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

SENTINEL = -512  # exact in bf16 and fp16, and beyond any valid result (|sum| <= 256)
ROOT = 0  # broadcast's root rank
EXACT_SUM_LIMIT = 256  # bf16 holds every integer up to 256 exactly
# Test-only: rank 0 adds 1 to this many result elements before checking, to prove #wrong and FAIL.
CORRUPT_ENV = "TORCHRIG_TEST_CORRUPT_ELEMENTS"


@dataclass(frozen=True)
class Dtype:
    name: str  # as the CLI takes it
    torch_dtype: torch.dtype
    nccl_name: str  # as nccl-tests prints it


DTYPES = {
    "fp32": Dtype("fp32", torch.float32, "float"),
    "bf16": Dtype("bf16", torch.bfloat16, "bfloat16"),
    "fp16": Dtype("fp16", torch.float16, "half"),
}


def value_amplitude(world: int) -> int:
    """Inputs lie in [-a, a] with a * world <= 256, so sums over all ranks stay exact in bf16."""
    return max(1, min(4, EXACT_SUM_LIMIT // world))


def _period(start: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """One period (m*m elements, m = 2a+1) of rank's input pattern, from element `start` on, as int64.

    Element i of rank r holds ((3i + 2*(i // m) + 5r) mod m) - a: neighbouring elements differ, the
    pattern shifts with the rank (distinct for up to m ranks), and it repeats only every m*m elements.
    """
    amplitude = value_amplitude(world)
    m = 2 * amplitude + 1
    i = torch.arange(start, start + m * m, dtype=torch.int64, device=device)
    return (i * 3 + (i // m) * 2 + rank * 5) % m - amplitude


def _tile(period: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    return period.to(like.dtype).repeat(-(-count // period.numel()))[:count]


def pattern(start: int, count: int, rank: int, world: int, like: torch.Tensor) -> torch.Tensor:
    """Elements [start, start + count) of rank's input, in like's dtype and device."""
    return _tile(_period(start, rank, world, like.device), count, like)


def summed(start: int, count: int, world: int, like: torch.Tensor) -> torch.Tensor:
    """Elements [start, start + count) of the sum of every rank's input."""
    total = sum(_period(start, rank, world, like.device) for rank in range(world))
    return _tile(total, count, like)


@dataclass
class Buffers:
    send: torch.Tensor
    recv: torch.Tensor  # the same tensor as send for in-place collectives


# (count, rank, world, like) -> what this rank sends (None: the sentinel), or what it must receive as
# (offset into recv, expected elements) pieces.
SendInput = Callable[[int, int, int, torch.Tensor], torch.Tensor | None]
Expected = Callable[[int, int, int, torch.Tensor], list[tuple[int, torch.Tensor]]]


# The tensor forms of all_gather / reduce_scatter were renamed *_single after torch 2.4; same arguments.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Collective:
    """One row of the table. `count` is the element count nccl-tests reports for the op's size."""

    name: str
    redop: str  # "sum" or "none", as nccl-tests prints it
    root: int  # -1 when the op has no root
    busbw_factor: Callable[[int], float]  # busbw = algbw * factor(ranks)
    sharded: bool  # count splits evenly across ranks (chunk = count // world)
    in_place: bool
    send_elems: Callable[[int, int], int]  # (count, world) -> elements
    recv_elems: Callable[[int, int], int]
    send_input: SendInput
    run: Callable[[Buffers], object]
    expected: Expected


def _whole(count: int, world: int) -> int:
    return count


def _chunk(count: int, world: int) -> int:
    return count // world


def _own_input(count: int, rank: int, world: int, like: torch.Tensor) -> torch.Tensor:
    """The first `count` elements of this rank's input pattern."""
    return pattern(0, count, rank, world, like)


def _ring_all_reduce(n: int) -> float:
    """A ring all-reduce: a reduce-scatter then an all-gather, each moving (n-1)/n of the buffer over each link."""
    return 2 * (n - 1) / n


def _ring_shard(n: int) -> float:
    """All-gather, reduce-scatter, all-to-all: each rank receives (or sends) the other ranks' (n-1)/n."""
    return (n - 1) / n


COLLECTIVES: dict[str, Collective] = {
    row.name: row
    for row in (
        Collective(
            name="all_reduce",
            redop="sum",
            root=-1,
            busbw_factor=_ring_all_reduce,
            sharded=False,
            in_place=True,
            send_elems=_whole,
            recv_elems=_whole,
            send_input=_own_input,
            run=lambda b: dist.all_reduce(b.recv, op=dist.ReduceOp.SUM),
            expected=lambda count, rank, world, like: [(0, summed(0, count, world, like))],
        ),
        Collective(
            name="all_gather",
            redop="none",
            root=-1,
            busbw_factor=_ring_shard,
            sharded=True,
            in_place=False,
            send_elems=_chunk,
            recv_elems=_whole,
            send_input=lambda count, rank, world, like: pattern(
                rank * (count // world), count // world, rank, world, like
            ),
            run=lambda b: _all_gather_tensor(b.recv, b.send),
            expected=lambda count, rank, world, like: [
                (q * (count // world), pattern(q * (count // world), count // world, q, world, like))
                for q in range(world)
            ],
        ),
        Collective(
            name="reduce_scatter",
            redop="sum",
            root=-1,
            busbw_factor=_ring_shard,
            sharded=True,
            in_place=False,
            send_elems=_whole,
            recv_elems=_chunk,
            send_input=_own_input,
            run=lambda b: _reduce_scatter_tensor(b.recv, b.send, op=dist.ReduceOp.SUM),
            expected=lambda count, rank, world, like: [
                (0, summed(rank * (count // world), count // world, world, like))
            ],
        ),
        Collective(
            name="all_to_all",
            redop="none",
            root=-1,
            busbw_factor=_ring_shard,
            sharded=True,
            in_place=False,
            send_elems=_whole,
            recv_elems=_whole,
            send_input=_own_input,
            run=lambda b: dist.all_to_all_single(b.recv, b.send),
            # rank q sends its chunk `rank` (elements rank*c .. (rank+1)*c of its input) to this rank
            expected=lambda count, rank, world, like: [
                (q * (count // world), pattern(rank * (count // world), count // world, q, world, like))
                for q in range(world)
            ],
        ),
        Collective(
            name="broadcast",
            redop="none",
            root=ROOT,
            busbw_factor=lambda n: 1.0,
            sharded=False,
            in_place=True,
            send_elems=_whole,
            recv_elems=_whole,
            send_input=lambda count, rank, world, like: pattern(0, count, ROOT, world, like) if rank == ROOT else None,
            run=lambda b: dist.broadcast(b.recv, src=ROOT),
            expected=lambda count, rank, world, like: [(0, pattern(0, count, ROOT, world, like))],
        ),
    )
}


@dataclass(frozen=True)
class Context:
    """This process's place in the group and how to measure."""

    rank: int
    world: int
    device: torch.device
    iters: int
    warmup: int


@dataclass
class Row:
    op: str
    bytes: int
    count: int
    type: str
    redop: str
    root: int
    time_us: float  # slowest rank's average over the queued loop
    algbw: float  # GB/s
    busbw: float  # GB/s
    wrong: int  # over all ranks
    lat_median_us: float  # per-call, synchronised; slowest rank's
    lat_p99_us: float


def element_count(collective: Collective, size_bytes: int, element_size: int, world: int) -> int:
    """Elements for a requested size, rounded down to a multiple of the ranks when the op shards."""
    count = max(size_bytes // element_size, 1)
    if collective.sharded:
        count = max(count // world, 1) * world
    return count


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def align_ranks(device: torch.device) -> None:
    """Start a timed loop on all ranks together: a tiny all-reduce, waited for."""
    dist.all_reduce(torch.zeros(1, device=device))
    synchronize(device)


def time_queued(run: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call with `iters` calls queued back to back.

    On GPU the loop sits between two CUDA events, so the host's launch cost overlaps the calls
    before it instead of being counted; on CPU (gloo, synchronous) it is wall-clock time.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    began = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - began) / iters


def time_each(run: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Seconds of each call on its own, waited for: launch cost included, and the spread shows."""
    seconds = []
    for _ in range(iters):
        synchronize(device)
        began = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - began)
    return seconds


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def fill(collective: Collective, buffers: Buffers, count: int, ctx: Context) -> None:
    if not collective.in_place:
        buffers.recv.fill_(SENTINEL)
    data = collective.send_input(count, ctx.rank, ctx.world, buffers.send)
    if data is None:
        buffers.send.fill_(SENTINEL)
    else:
        buffers.send.copy_(data)


def count_wrong(collective: Collective, buffers: Buffers, count: int, ctx: Context) -> torch.Tensor:
    """Elements of this rank's result that differ from the exact answer, as a 1-element int64 tensor."""
    wrong = torch.zeros(1, dtype=torch.int64, device=ctx.device)
    for offset, piece in collective.expected(count, ctx.rank, ctx.world, buffers.recv):
        wrong += (buffers.recv[offset : offset + piece.numel()] != piece).sum()
    return wrong


def _corrupt_for_test(recv: torch.Tensor, rank: int) -> None:
    elements = int(os.environ.get(CORRUPT_ENV, "0") or 0)
    if rank == 0 and elements > 0:
        recv.view(-1)[:elements].add_(1)


def allocate(collective: Collective, count: int, dtype: torch.dtype, ctx: Context) -> Buffers:
    send = torch.empty(collective.send_elems(count, ctx.world), dtype=dtype, device=ctx.device)
    if collective.in_place:
        return Buffers(send, send)
    return Buffers(send, torch.empty(collective.recv_elems(count, ctx.world), dtype=dtype, device=ctx.device))


def measure(collective: Collective, size_bytes: int, dtype: Dtype, ctx: Context) -> Row:
    """Time one collective at one size (queued loop and per-call), then check a fresh run element by element."""
    element_size = dtype.torch_dtype.itemsize
    count = element_count(collective, size_bytes, element_size, ctx.world)
    buffers = allocate(collective, count, dtype.torch_dtype, ctx)
    fill(collective, buffers, count, ctx)

    run = functools.partial(collective.run, buffers)  # no Python frame of ours inside the timed loops
    for _ in range(ctx.warmup):
        run()
    align_ranks(ctx.device)
    seconds = time_queued(run, ctx.iters, ctx.device)
    align_ranks(ctx.device)
    each = time_each(run, ctx.iters, ctx.device)

    # Timing ran in-place ops on their own output: start the checked run from fresh inputs.
    fill(collective, buffers, count, ctx)
    run()
    _corrupt_for_test(buffers.recv, ctx.rank)
    wrong = count_wrong(collective, buffers, count, ctx)
    dist.all_reduce(wrong, op=dist.ReduceOp.SUM)
    slowest = torch.tensor(
        [seconds, statistics.median(each), percentile(each, 99)], dtype=torch.float64, device=ctx.device
    )
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seconds, median, p99 = slowest.tolist()

    nbytes = count * element_size
    algbw = nbytes / seconds / 1e9
    return Row(
        op=collective.name,
        bytes=nbytes,
        count=count,
        type=dtype.nccl_name,
        redop=collective.redop,
        root=collective.root,
        time_us=seconds * 1e6,
        algbw=algbw,
        busbw=algbw * collective.busbw_factor(ctx.world),
        wrong=int(wrong.item()),
        lat_median_us=median * 1e6,
        lat_p99_us=p99 * 1e6,
    )


def launch_overhead(ctx: Context, calls: int) -> tuple[float, float]:
    """Seconds per 8-byte all_reduce, queued vs each call waited for (slowest rank's): what queueing hides."""
    buffers = allocate(COLLECTIVES["all_reduce"], 2, torch.float32, ctx)
    buffers.send.zero_()

    run = functools.partial(dist.all_reduce, buffers.recv)
    for _ in range(ctx.warmup):
        run()
    align_ranks(ctx.device)
    queued = time_queued(run, calls, ctx.device)
    align_ranks(ctx.device)
    each = statistics.fmean(time_each(run, calls, ctx.device))
    slowest = torch.tensor([queued, each], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    queued, each = slowest.tolist()
    return queued, each
