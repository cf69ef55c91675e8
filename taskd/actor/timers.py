"""The actor's timers: one heap of deadlines, and one event-loop timer for all.

Heartbeat deadlines, spawn timeouts, long-poll deadlines, cancel grace periods and
store retries go in one heap; TTL expiry is asked of the state. The actor fires what
is due at the start of each batch, and keeps a single ``loop.call_at`` handle armed
for the earliest deadline, which posts a ``Tick`` to the mailbox: no periodic scan,
and the mailbox loop never waits with a timeout.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Kind", "Timers"]


class Kind(enum.IntEnum):
    """What a deadline is for."""

    HEARTBEAT = 0
    TIMEOUT = 1
    WAIT = 2
    GRACE = 3
    RETRY = 4
    #: The shared task space's sweep of deadlines (Redis mode).
    SWEEP = 5


_Entry = tuple[float, int, Kind, str, "asyncio.Future[Any] | None"]


class Timers:
    """A heap of deadlines and the one loop timer that wakes the actor for them."""

    def __init__(self, clock: Callable[[], float], wake: Callable[[], None]) -> None:
        self._clock = clock
        self._wake = wake
        self._heap: list[_Entry] = []
        self._seq = 0
        #: Earliest deadline of any timer (may be early, never late).
        self.due = math.inf
        self._armed_at = math.inf
        self._handle: asyncio.TimerHandle | None = None
        self._fire_at = 0.0
        #: How late (seconds) the loop ran the last firing: the event loop's lag, as
        #: this process's /metrics reports it.
        self.lag = 0.0

    def push(
        self, when: float, kind: Kind, task_id: str, fut: asyncio.Future[Any] | None = None
    ) -> None:
        """Add a deadline (wall-clock seconds)."""
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, task_id, fut))
        if when < self.due:
            self.due = when

    def pop_due(self, now: float) -> Iterator[tuple[Kind, str, asyncio.Future[Any] | None]]:
        """Take every deadline at or before ``now``, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, task_id, fut = heapq.heappop(heap)
            yield kind, task_id, fut

    def reset_due(self, other: float | None) -> None:
        """Recompute ``due`` from the heap and ``other`` (the next TTL expiry)."""
        due = math.inf if other is None else other
        if self._heap and self._heap[0][0] < due:
            due = self._heap[0][0]
        self.due = due

    def arm(self) -> None:
        """Have the event loop call ``wake`` at the earliest deadline, if that moved
        nearer since the last arming."""
        if self.due >= self._armed_at:
            return
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        delay = max(self.due - self._clock(), 0.0)
        self._fire_at = loop.time() + delay
        self._handle = loop.call_at(self._fire_at, self._fire)
        self._armed_at = self.due

    def _fire(self) -> None:
        self.lag = max(asyncio.get_running_loop().time() - self._fire_at, 0.0)
        self._handle = None
        self._armed_at = math.inf
        self._wake()

    def cancel(self) -> None:
        """Cancel the loop timer (the actor is stopping)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
