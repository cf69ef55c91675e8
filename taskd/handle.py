"""What callers hold besides the ``Tracker``: ``TaskHandle`` (what ``spawn`` returns),
``TrackerState`` (where a tracker is in its life), ``TaskPage`` and ``WouldBlock``."""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._models import TaskRecord
from .actor.outcome import Outcome
from .engine.state import Page

__all__ = ["Canceller", "TaskHandle", "TaskPage", "TrackerState", "WouldBlock"]

T = TypeVar("T")

#: One page of a listing and the cursor of the next (``Tracker.list_page``).
TaskPage = Page


class Canceller(Protocol):
    """What a handle needs of its tracker: ``cancel``."""

    async def cancel(self, task_id: str, *, reason: str = ..., owner: Any = ...) -> TaskRecord:
        """Cancel the task."""
        ...


class WouldBlock(Exception):
    """``Tracker.get_nowait`` cannot answer without the actor: ``await get`` instead
    (anyio's ``WouldBlock`` for ``receive_nowait``)."""


class TrackerState(enum.Enum):
    """Where a tracker is in its life."""

    #: Built, not yet entered: calls raise TrackerClosed.
    NEW = "new"
    #: The actor runs and takes commands.
    OPEN = "open"
    #: ``aclose`` has begun: no new commands; running spawned tasks wind down.
    CLOSING = "closing"
    #: The actor has stopped (closed, or died): every call raises TrackerClosed.
    CLOSED = "closed"


class TaskHandle(Outcome[T]):
    """What ``spawn`` returns: the task's id, and awaitable for the coroutine's outcome
    (``await handle`` is the coroutine's return value, typed as the coroutine's).

    ``await handle`` gives the return value, or re-raises the coroutine's exception
    (``TimeoutError`` if its ``timeout`` ran out, ``CancelledError`` if cancelled),
    once the terminal record is stored.

    A handle is future-like (``done``, ``result``, ``exception``, ``cancelled``,
    ``add_done_callback``, ``get_loop``): ``asyncio.gather(*handles)``,
    ``asyncio.wait`` and ``as_completed`` take handles as they are, with no task made
    per handle (docs/embedding.md).

    The handle is the outcome the actor settles (an ``Outcome``), not a wrapper of
    one: a fan-out keeps thousands alive at once, and one object each instead of two
    is less for the cyclic collector to walk, and a call less per ``await``.
    """

    __slots__ = ("_created", "_loop", "_tracker")
    #: Marks a future-like object (``asyncio.isfuture``): set, never True (a handle is
    #: awaited through its ``__await__``, never yielded to the event loop itself).
    _asyncio_future_blocking = False

    def __init__(self, tracker: Canceller) -> None:
        super().__init__()
        self._tracker = tracker
        #: The record as created; set by ``spawn`` once it has one (the handle is
        #: made first: the actor settles it).
        self._created: TaskRecord | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def record(self) -> TaskRecord:
        """The record as it was created (``running``: a spawned task runs from the
        start) until the outcome is known, then the terminal record the tracker
        stored: once ``await handle`` returned or raised, it says how the task ended.
        No call to the tracker: the actor hands it over with the outcome."""
        settled = self._record
        if settled is not None:
            return settled
        assert self._created is not None  # (spawn sets it before handing the handle out)
        return self._created

    @property
    def task_id(self) -> str:
        """The tracked task's id."""
        return self.record.task_id

    def cancel(
        self, reason: str = "cancelled", *, msg: object = None
    ) -> asyncio.Future[TaskRecord]:
        """Ask the tracker to cancel this task (see ``Tracker.cancel``).

        Sent at once; await the result for the record. ``msg`` is what
        ``asyncio.gather`` passes when it is cancelled: used as the reason."""
        text = reason if msg is None else str(msg)
        sent = self._loop.create_task(self._tracker.cancel(self.task_id, reason=text))
        sent.add_done_callback(_quiet)  # (a cancel nobody awaits may be refused: fine)
        return sent

    def add_done_callback(
        self, fn: Callable[[TaskHandle[T]], object], *, context: contextvars.Context | None = None
    ) -> None:
        """Call ``fn(handle)`` once the outcome is known (a future's protocol)."""
        self.add_callback(fn, self, context)

    def remove_done_callback(self, fn: Callable[[TaskHandle[T]], object]) -> int:
        """Forget ``fn``; how many callbacks were removed."""
        return self.remove_callback(fn)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the task runs on."""
        return self._loop

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        # (asyncio.gather asks a cancelled child for the error it propagates)
        return asyncio.CancelledError()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.record.task_type}>"


def _quiet(sent: asyncio.Task[TaskRecord]) -> None:
    if not sent.cancelled():
        sent.exception()  # retrieved: a refusal nobody awaited is not logged
