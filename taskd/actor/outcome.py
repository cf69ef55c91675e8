"""``Outcome``: how a spawned coroutine ended, set once by the actor and awaited by
the coroutine's ``TaskHandle`` (any number of awaiters)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, Generic, TypeVar, cast

from .._models import TaskRecord, TaskStatus

__all__ = ["Outcome"]

T = TypeVar("T")


class Outcome(Generic[T]):
    """How a spawned coroutine ended: set once by the actor, awaited by anyone.

    Each awaiter waits on a future of its own, so cancelling one awaiter never
    cancels the outcome for the others, and the actor wakes awaiters directly
    (no extra event-loop hop through ``asyncio.shield``).
    """

    __slots__ = ("_exc", "_record", "_status", "_value", "_waiters")

    def __init__(self) -> None:
        self._status: TaskStatus | None = None
        self._value: T | None = None
        self._exc: BaseException | None = None
        self._record: TaskRecord | None = None
        # Made on the first await: most outcomes are awaited by one caller or none.
        self._waiters: list[asyncio.Future[None]] | None = None

    def done(self) -> bool:
        """Whether the outcome is known."""
        return self._status is not None

    @property
    def record(self) -> TaskRecord | None:
        """The terminal record the outcome was settled with (None before, and when
        the tracker closed or refused the task before any terminal record)."""
        return self._record

    def set(
        self,
        status: TaskStatus,
        value: Any,
        exc: BaseException | None,
        record: TaskRecord | None = None,
    ) -> None:
        """Record the outcome (actor only, after the terminal record is committed),
        with that terminal record when there is one."""
        if self._status is not None:
            return
        # The record first: an awaiter woken below reads handle.record at once.
        self._record = record
        self._status, self._value, self._exc = status, value, exc
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def __await__(self) -> Generator[Any, None, T]:
        if self._status is None:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                yield from waiter
            finally:
                if not waiter.done() and self._waiters and waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._status is TaskStatus.COMPLETED:
            return cast(T, self._value)
        if self._exc is not None:
            raise self._exc
        raise asyncio.CancelledError()
