"""``Outcome``: how a spawned coroutine ended, set once by the actor and awaited by
the coroutine's ``TaskHandle`` (any number of awaiters)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from .._models import TaskRecord, TaskStatus

__all__ = ["Outcome"]

T = TypeVar("T")


class Outcome(Generic[T]):
    """How a spawned coroutine ended: set once by the actor, awaited by anyone.

    Each awaiter waits on a future of its own, so cancelling one awaiter never
    cancels the outcome for the others, and the actor wakes awaiters directly
    (no extra event-loop hop through ``asyncio.shield``).
    """

    __slots__ = ("_callbacks", "_exc", "_record", "_status", "_value", "_waiters")

    def __init__(self) -> None:
        self._status: TaskStatus | None = None
        self._value: T | None = None
        self._exc: BaseException | None = None
        self._record: TaskRecord | None = None
        # Made on the first await: most outcomes are awaited by one caller or none.
        self._waiters: list[asyncio.Future[None]] | None = None
        #: Done callbacks (a future's protocol, for ``asyncio.gather``): (fn, arg,
        #: context, loop), called soon once the outcome is set.
        self._callbacks: list[tuple[Callable[[Any], object], Any, Any, Any]] | None = None

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
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for fn, arg, context, loop in callbacks:
                loop.call_soon(fn, arg, context=context)

    def add_callback(
        self, fn: Callable[[Any], object], arg: object, context: contextvars.Context | None
    ) -> None:
        """Call ``fn(arg)`` soon once the outcome is set (at once if it is)."""
        loop = asyncio.get_running_loop()
        if self._status is not None:
            loop.call_soon(fn, arg, context=context)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append((fn, arg, context, loop))

    def remove_callback(self, fn: Callable[[Any], object]) -> int:
        """Forget ``fn``'s callbacks; how many there were."""
        if not self._callbacks:
            return 0
        kept = [c for c in self._callbacks if c[0] != fn]
        removed = len(self._callbacks) - len(kept)
        self._callbacks = kept
        return removed

    def result(self) -> T:
        """The outcome as ``await`` gives it, without waiting (``InvalidStateError``
        before it is known)."""
        if self._status is None:
            raise asyncio.InvalidStateError("the task's outcome is not known yet")
        if self._status is TaskStatus.COMPLETED:
            return self._value  # type: ignore[return-value]  # (T: no cast call)
        if self._exc is not None:
            raise self._exc
        raise asyncio.CancelledError()

    def exception(self) -> BaseException | None:
        """The exception the outcome raises (None when completed)."""
        if self._status is None:
            raise asyncio.InvalidStateError("the task's outcome is not known yet")
        if self._status is not TaskStatus.COMPLETED and self._exc is None:
            raise asyncio.CancelledError()
        return self._exc

    def cancelled(self) -> bool:
        """Whether the coroutine was cancelled."""
        return (
            self._status is not None
            and self._status is not TaskStatus.COMPLETED
            and (self._exc is None)
        )

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
        return self.result()
