"""A clock the test moves by hand: wall and monotonic time advance only when told."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import datetime, timedelta


class ManualClock:
    """Implements :class:`qbo_daemon.core.clock.Clock`.

    ``advance`` moves both clocks and wakes sleepers whose time has come;
    ``jump_wall`` moves only the wall clock, as NTP or a suspended laptop does
    (asyncio's monotonic clock stops during suspend).
    """

    def __init__(self, start: datetime) -> None:
        self._wall = start
        self._mono = 1000.0
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many waits are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_wake(self) -> float | None:
        """Monotonic seconds until the earliest pending sleeper wakes."""
        pending = [t for t, _, f in self._sleepers if not f.done()]
        return min(pending) - self._mono if pending else None

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)
        self._wake()

    def jump_wall(self, delta: timedelta) -> None:
        self._wall += delta

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
