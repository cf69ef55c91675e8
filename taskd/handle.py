"""What callers hold besides the ``Tracker``: ``TaskHandle`` (what ``spawn`` returns),
``TrackerState`` (where a tracker is in its life), ``TaskPage`` and ``WouldBlock``."""

from __future__ import annotations

import enum
from collections.abc import Generator
from typing import Any, Generic, Protocol, TypeVar

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


class TaskHandle(Generic[T]):
    """What ``spawn`` returns: the task's id, and awaitable for the coroutine's outcome
    (``await handle`` is the coroutine's return value, typed as the coroutine's).

    ``await handle`` gives the return value, or re-raises the coroutine's exception
    (``TimeoutError`` if its ``timeout`` ran out, ``CancelledError`` if cancelled),
    once the terminal record is stored.
    """

    __slots__ = ("_created", "_done", "_tracker")

    def __init__(self, tracker: Canceller, record: TaskRecord, done: Outcome[T]):
        self._tracker = tracker
        self._done = done
        self._created = record

    @property
    def record(self) -> TaskRecord:
        """The record as it was created (``running``: a spawned task runs from the
        start) until the outcome is known, then the terminal record the tracker
        stored: once ``await handle`` returned or raised, it says how the task ended.
        No call to the tracker: the actor hands it over with the outcome."""
        settled = self._done.record
        return self._created if settled is None else settled

    @property
    def task_id(self) -> str:
        """The tracked task's id."""
        return self.record.task_id

    def done(self) -> bool:
        """True once the outcome is known."""
        return self._done.done()

    async def cancel(self, reason: str = "cancelled") -> TaskRecord:
        """Ask the tracker to cancel this task (see ``Tracker.cancel``)."""
        return await self._tracker.cancel(self.task_id, reason=reason)

    def __await__(self) -> Generator[Any, None, T]:
        return self._done.__await__()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.record.task_type}>"
