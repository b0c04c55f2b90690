"""End a hung job within a bounded time, naming the rank that stopped answering.

Every rank publishes where it is — (step, phase) — to the rendezvous store from a
background thread; the training loop only assigns two attributes, so the hot path pays
nothing. When a rank has made no progress for the timeout (a short one until the first
collective has completed, train.timeout_s after that), it reads everybody's position:
the ranks furthest behind are the ones that stopped answering; if all are level, they all
wait inside one collective, which is a communication hang. One rank prints the verdict,
and every rank exits, so torchrun ends the job instead of NCCL's 30-minute default.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from env.rig.launch import USER_ERROR_EXIT

# Phases of a step, in order; a rank stuck in an earlier phase is behind one in a later one.
PHASES = ("start", "backward", "sync", "checkpoint")
# Set when this process's watchdog is ending it: a collective failing meanwhile is a symptom, not news.
FIRING = threading.Event()
# A rank that stopped answering leaves last, so that the verdict is printed before its sockets close.
LAGGARD_GRACE_S = 3.0


class Watchdog:
    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        first_timeout_s: float,
        timeout_s: float,
        last_checkpoint: Callable[[], str],
        on_fire: Callable[[], None] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.first_timeout_s = first_timeout_s
        self.timeout_s = timeout_s
        self.last_checkpoint = last_checkpoint
        self.on_fire = on_fire
        self.step = 0
        self.phase = "start"
        self.first_collective_done = False
        self._progress_at = time.monotonic()
        self._published: tuple[int, str] | None = None
        self._stop = threading.Event()
        self._store = store if world_size > 1 else None  # a PrefixStore of its own in the job's store
        self._thread = threading.Thread(target=self._run, name="torchrig-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self._store is not None:
            self._thread.start()
        return self

    def mark(self, step: int, phase: str) -> None:
        """Called by the training loop; cheap enough for every micro-step."""
        self.step, self.phase = step, phase
        self._progress_at = time.monotonic()

    def first_collective_completed(self) -> None:
        self.first_collective_done = True
        self._progress_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._store = None  # close the store connection before the process group goes away

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            position = (self.step, self.phase)
            if position != self._published:
                try:
                    self._store.set(str(self.rank), f"{position[0]}:{position[1]}")
                    self._published = position
                except Exception:  # the store's host is gone (rank 0 died): the timeout below must still run
                    pass
            limit = self.timeout_s if self.first_collective_done else self.first_timeout_s
            stalled = time.monotonic() - self._progress_at
            if stalled > limit:
                self._fire(limit)

    def _positions(self) -> dict[int, tuple[int, int]]:
        keys = [str(r) for r in range(self.world_size)]
        positions = {}
        for rank, key in enumerate(keys):
            if self._store.check([key]):
                step, phase = self._store.get(key).decode().split(":")
                positions[rank] = (int(step), PHASES.index(phase))
            else:
                positions[rank] = (-1, 0)  # never reported: stuck before its first step
        return positions

    def _fire(self, limit: float) -> None:
        FIRING.set()
        if self.on_fire is not None:
            try:
                self.on_fire()
            except Exception as exc:  # a failed dump must not keep a hung job alive
                print(f"torchrig: rank {self.rank}: flight recorder dump failed ({exc})", file=sys.stderr)
        store_lost = False
        try:
            positions = self._positions()
        except Exception:  # the store itself is gone: every rank is on its own
            positions = {self.rank: (self.step, PHASES.index(self.phase))}
            store_lost = True
        behind = min(positions.values())
        laggards = sorted(r for r, p in positions.items() if p == behind)
        answering = sorted(set(positions) - set(laggards))
        reporter = answering[0] if answering else min(positions)  # without the store, each rank speaks for itself
        if self.rank == reporter:
            which = "the first collective" if not self.first_collective_done else f"step {max(behind[0], 0)}"
            if store_lost:
                what = f"rank {self.rank} lost the rendezvous store (its host, rank 0 or the launcher, died) at {which}"
            elif answering:
                what = f"rank {', '.join(map(str, laggards))} stopped answering at {which}"
            else:
                what = f"every rank waits inside one collective at {which} (a communication hang)"
            hint = (
                " Usual causes: P2P on GeForce cards (NCCL_P2P_DISABLE=1), ACS/IOMMU, a small /dev/shm,"
                " or a firewall / NCCL_SOCKET_IFNAME between nodes; make nccl-test checks them."
                if not store_lost and (not self.first_collective_done or not answering)
                else ""
            )
            print(
                f"torchrig: {what}; no progress for {limit:.0f} s, so the job ends now. "
                f"{self.last_checkpoint()}.{hint}",
                file=sys.stderr,
                flush=True,
            )
        if self.rank in laggards and answering:
            time.sleep(LAGGARD_GRACE_S)
        os._exit(USER_ERROR_EXIT)
