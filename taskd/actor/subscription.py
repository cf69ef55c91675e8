"""Subscriptions: bounded, coalescing buffers of changes pushed by the actor.

The actor must never wait for a reader, so ``push`` never blocks. A buffer holds at
most ``maxsize`` changes; when it is full, queued changes are coalesced to the latest
record of each task (intermediate progress steps are dropped, the newest state is
kept, the order of tasks is kept). If the buffer still holds ``maxsize`` distinct
tasks after that, the subscriber is too slow to follow: the subscription ends with
``overflowed`` set, and an SSE client reconnects with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .._models import ANY_OWNER, OwnerScope, TaskRecord, TaskStatus

__all__ = ["Subscription"]


class Subscription:
    """One reader's view of changes: a single task's, or all matching a filter."""

    __slots__ = (
        "_buffer",
        "_ended",
        "_waiter",
        "maxsize",
        "overflowed",
        "owner",
        "resource_id",
        "resume_from",
        "resumed",
        "since",
        "statuses",
        "task_id",
        "task_type",
    )

    def __init__(
        self,
        *,
        task_id: str | None = None,
        owner: OwnerScope = ANY_OWNER,
        statuses: frozenset[TaskStatus] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        maxsize: int = 1024,
        resume_from: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.owner = owner
        self.statuses = statuses
        self.task_type = task_type
        self.resource_id = resource_id
        self.maxsize = maxsize
        self.overflowed = False
        #: Replay changes after this sequence number, if the actor still has them.
        self.resume_from = resume_from
        #: Set by the actor when the replay covered everything since ``resume_from``.
        self.resumed = False
        #: Changes with a sequence number up to this one happened before subscribing.
        self.since = 0
        self._buffer: deque[tuple[int, TaskRecord]] = deque()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None

    def matches(self, rec: TaskRecord) -> bool:
        """Whether a change to ``rec`` belongs in this subscription."""
        if self.owner is not ANY_OWNER and rec.owner != self.owner:
            return False
        if self.statuses is not None and rec.status not in self.statuses:
            return False
        if self.task_type is not None and rec.task_type != self.task_type:
            return False
        return self.resource_id is None or rec.resource_id == self.resource_id

    @property
    def queued(self) -> int:
        """Changes waiting to be read."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        """True once no further change will be pushed."""
        return self._ended

    def push(self, seq: int, rec: TaskRecord) -> None:
        """Queue one change (actor only). Never blocks."""
        if self._ended or seq <= self.since:
            return
        buffer = self._buffer
        if len(buffer) >= self.maxsize:
            latest: dict[str, tuple[int, TaskRecord]] = {}
            for item in buffer:
                latest.pop(item[1].task_id, None)
                latest[item[1].task_id] = item
            latest.pop(rec.task_id, None)
            buffer.clear()
            buffer.extend(latest.values())
            if len(buffer) >= self.maxsize:
                self.overflowed = True
                self.end()
                return
        buffer.append((seq, rec))
        self._wake()

    def end(self) -> None:
        """Mark the stream finished; the reader drains what is queued, then stops."""
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> tuple[int, TaskRecord] | None:
        """The next queued change, waiting for one; None once the stream has ended."""
        while not self._buffer:
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buffer.popleft()
