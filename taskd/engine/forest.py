"""``Forest``: the parent links of one task space, for ``TaskState``.

A record names its parent (``parent_id``, fixed at creation). The forest keeps what
the links imply and a record cannot hold: the ids of each parent's children (newest
last: ids sort in creation order), for ``?parent_id=`` listings and for walking a
subtree (cascading cancel, deleting a subtree), and each task's number of active
descendants, which decides when a held outcome applies, and what retention and
delete may remove (docs/trees.md). The children's counts by status live in the
parent's record itself (``children``): they are part of what it renders.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from .._models import TERMINAL, TaskStatus

__all__ = ["Forest", "finished_share"]


def finished_share(children: Mapping[str, int]) -> float:
    """The progress of a parent awaiting its children: the share of them finished
    (children counts by status; none: 0.0), to 4 places (docs/trees.md)."""
    done = sum(n for status, n in children.items() if TaskStatus(status) in TERMINAL)
    return round(done / max(1, sum(children.values())), 4)


class Forest:
    """Children by parent and active descendants by task; see the module docstring."""

    __slots__ = ("_children", "_live")

    def __init__(self) -> None:
        self._children: dict[str, SortedList] = {}
        # Only tasks with an active descendant have an entry (most tasks have none).
        self._live: dict[str, int] = {}

    def children(self, parent_id: str) -> SortedList | None:
        """The ids of ``parent_id``'s children held, oldest first (None: none)."""
        return self._children.get(parent_id)

    def link(self, parent_id: str, child_id: str) -> None:
        """A child of ``parent_id`` was added."""
        ids = self._children.get(parent_id)
        if ids is None:
            ids = self._children[parent_id] = SortedList()
        ids.add(child_id)

    def unlink(self, parent_id: str, child_id: str) -> None:
        """A child of ``parent_id`` was removed."""
        ids = self._children.get(parent_id)
        if ids is not None:
            ids.discard(child_id)
            if not ids:
                del self._children[parent_id]

    def live(self, task_id: str) -> int:
        """How many of ``task_id``'s descendants are active."""
        return self._live.get(task_id, 0)

    def add_live(self, task_id: str, delta: int) -> int:
        """Change ``task_id``'s count of active descendants; the new count."""
        n = self._live.get(task_id, 0) + delta
        if n > 0:
            self._live[task_id] = n
        else:
            self._live.pop(task_id, None)
        return n

    def subtree(self, task_id: str) -> Iterator[str]:
        """``task_id``'s descendants held, parents before their children."""
        stack = [task_id]
        while stack:
            ids = self._children.get(stack.pop())
            if ids:
                for child in ids:
                    yield child
                    stack.append(child)
