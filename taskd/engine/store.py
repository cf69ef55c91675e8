"""The store interface the actor writes through, and the in-memory store.

The actor is a store's only writer. After each batch of mailbox commands it calls
``write`` once with every record the batch changed and every id it removed, and only
when that is done does it answer the batch's callers (group commit). One write is in
flight at a time: the batches handled meanwhile are written together by the next one
(``engine/pipeline.py``). A store that keeps nothing (``MemoryStore``) declares
``persistent = False`` and the actor skips the call entirely.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Sequence
from typing import Protocol, runtime_checkable

from .._models import TaskRecord

__all__ = ["MemoryStore", "Store"]


@runtime_checkable
class Store(Protocol):
    """What the actor needs from a place that keeps records."""

    #: False when the store keeps nothing beyond the actor's own memory.
    persistent: bool

    async def open(self) -> Sequence[TaskRecord]:
        """Prepare the store and return every record it holds, oldest first."""
        ...

    def write(self, upserts: Collection[TaskRecord], deletes: Collection[str]) -> Awaitable[None]:
        """Durably apply one batch: replace or insert ``upserts``, remove ``deletes``;
        done once it is committed. An ``async def`` will do; a store that starts the
        work at the call (``SQLiteStore``: on its thread) lets it begin before the
        actor next yields to the event loop."""
        ...

    async def close(self) -> None:
        """Release the store's resources; idempotent."""
        ...


class MemoryStore:
    """The default store: records live only in the actor's memory and die with it."""

    persistent = False

    async def open(self) -> Sequence[TaskRecord]:
        """Nothing survives a restart, so there is nothing to load."""
        return ()

    async def write(self, upserts: Collection[TaskRecord], deletes: Collection[str]) -> None:
        """Nothing to do: the actor's state is the only copy."""

    async def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return "MemoryStore()"
