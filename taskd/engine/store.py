"""The store interface the actor writes through, and the in-memory store.

The actor is a store's only writer. After each batch of mailbox commands it calls
``write`` once with every record the batch changed and every id it removed, and only
when that returns does it answer the batch's callers (group commit). A store that
keeps nothing (``MemoryStore``) declares ``persistent = False`` and the actor skips
the call entirely.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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

    async def write(self, upserts: Collection[TaskRecord], deletes: Collection[str]) -> None:
        """Durably apply one batch: replace or insert ``upserts``, remove ``deletes``."""
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
