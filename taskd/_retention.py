"""Retention policy: TTL per terminal status and the cap on stored records.

TTLs are the same for every record of a status, so records of one status expire in
the order they finished. A FIFO queue per terminal status therefore replaces a heap:
the next expiry is always at a queue's head, found in O(1), and no timer ever scans
all records.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ._checks import check_seconds
from ._models import TaskRecord, TaskStatus

__all__ = ["Retention"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long finished tasks are kept, and how many records at most.

    TTLs count from ``finished_at``; active tasks never expire. When ``max_tasks``
    records exist, each insert evicts the oldest terminal record; if all are active
    the insert fails with ``TrackerFull``. ``max_active_per_owner`` bounds each
    owner's active tasks, so that one owner cannot take every slot.
    """

    completed_ttl: float = 86400.0
    failed_ttl: float = 604800.0
    cancelled_ttl: float = 86400.0
    max_tasks: int = 10000
    #: At most this many active tasks per owner (None: no bound); over it, create and
    #: spawn raise ``QuotaExceeded`` (HTTP 429).
    max_active_per_owner: int | None = None

    def __post_init__(self) -> None:
        for name in ("completed_ttl", "failed_ttl", "cancelled_ttl"):
            if getattr(self, name) is None:
                raise TypeError(f"Retention.{name} must be a number of seconds")
            check_seconds(getattr(self, name), f"Retention.{name}")
        if isinstance(self.max_tasks, bool) or not isinstance(self.max_tasks, int):
            raise TypeError("Retention.max_tasks must be an int")
        if self.max_tasks < 1:
            raise ValueError("Retention.max_tasks must be at least 1")
        quota = self.max_active_per_owner
        if quota is not None:
            if isinstance(quota, bool) or not isinstance(quota, int):
                raise TypeError("Retention.max_active_per_owner must be an int or None")
            if quota < 1:
                raise ValueError("Retention.max_active_per_owner must be at least 1")

    def ttl(self, status: TaskStatus) -> float:
        """The TTL of a terminal status."""
        if status is TaskStatus.COMPLETED:
            return self.completed_ttl
        if status is TaskStatus.FAILED:
            return self.failed_ttl
        if status is TaskStatus.CANCELLED:
            return self.cancelled_ttl
        raise ValueError(f"{status} is not terminal")


class ExpiryQueues:
    """Per terminal status, the ids of finished records in the order they finished.

    Only ids are queued (8 bytes an entry); the deadline is read from the record's
    ``finished_at``. A deleted or evicted record leaves a stale id that is dropped when
    it reaches the head; ``compact`` bounds that garbage when it outgrows the live set.
    """

    __slots__ = ("_latest", "_queues", "_retention")

    def __init__(self, retention: Retention) -> None:
        self._retention = retention
        self._queues: dict[TaskStatus, deque[str]] = {
            TaskStatus.COMPLETED: deque(),
            TaskStatus.FAILED: deque(),
            TaskStatus.CANCELLED: deque(),
        }
        # The latest finishing instant queued per status (queues stay in that order).
        self._latest: dict[TaskStatus, float] = dict.fromkeys(self._queues, -math.inf)

    def push(
        self,
        status: TaskStatus,
        task_id: str,
        finished_at: float,
        lookup: Callable[[str], TaskRecord | None],
    ) -> float:
        """Queue a record that just reached a terminal status; return its expiry."""
        queue = self._queues[status]
        if finished_at >= self._latest[status]:
            self._latest[status] = finished_at
            queue.append(task_id)  # the common case: records finish in order
        else:
            # Ids minted in one clock instant are a microsecond apart and a record's
            # times never go below its creation, so a record may finish a few
            # microseconds "before" one changed just ahead of it: insert it in
            # finishing order (it walks back over those few).
            i = len(queue)
            while i:
                rec = lookup(queue[i - 1])
                if rec is None or rec.finished_at is None or rec.finished_at <= finished_at:
                    break
                i -= 1
            queue.insert(i, task_id)
        return finished_at + self._retention.ttl(status)

    def next_deadline(self, lookup: Callable[[str], TaskRecord | None]) -> float | None:
        """The earliest expiry instant, or None when nothing is queued."""
        best: float | None = None
        for status, queue in self._queues.items():
            while queue:
                rec = lookup(queue[0])
                if rec is None or rec.status is not status or rec.finished_at is None:
                    queue.popleft()  # stale: deleted or evicted since it was queued
                    continue
                deadline = rec.finished_at + self._retention.ttl(status)
                if best is None or deadline < best:
                    best = deadline
                break
        return best

    def pop_due(self, now: float, lookup: Callable[[str], TaskRecord | None]) -> list[str]:
        """Remove and return the ids of every live record whose TTL has passed."""
        due: list[str] = []
        for status, queue in self._queues.items():
            ttl = self._retention.ttl(status)
            while queue:
                rec = lookup(queue[0])
                if rec is None or rec.status is not status or rec.finished_at is None:
                    queue.popleft()
                elif rec.finished_at + ttl <= now:
                    due.append(queue.popleft())
                else:
                    break
        return due

    def compact(self, live: int, lookup: Callable[[str], TaskRecord | None]) -> None:
        """Drop stale ids once the queues hold more than twice the live terminal count."""
        if sum(len(q) for q in self._queues.values()) <= 2 * live + 64:
            return
        for status, queue in self._queues.items():
            self._queues[status] = deque(
                i for i in queue if (r := lookup(i)) is not None and r.status is status
            )
