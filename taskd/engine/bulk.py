"""Bulk delete's command: the filters of ``Tracker.delete_many`` checked and turned
into one ``DeleteMany`` message (each engine answers it as one command)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from .._args import check_owner, check_resource_id, check_statuses, check_task_type
from .._checks import check_limit
from .._models import ANY_OWNER, TERMINAL, OwnerScope, TaskStatus
from ..actor import messages as m

__all__ = ["MAX_DELETE", "before_cursor", "delete_message"]

#: Tasks one command deletes at most (a page token goes on).
MAX_DELETE: Final = 1000


def before_cursor(before: float) -> str:
    """The id cursor of "created before ``before``" (Unix seconds): ids start with
    their creation instant in microseconds, 13 hex digits, and sort by it."""
    micros = before * 1_000_000
    # (clamped: before 1970 is no task, past the 13 digits' end, in 2112, is every one)
    return f"{0 if micros <= 0 else min(int(min(micros, 16.0**13)), 16**13 - 1):013x}"


def delete_message(
    limit: int,
    cursor: str | None,
    *,
    status: TaskStatus | str | Collection[TaskStatus | str] | None = None,
    task_type: str | None = None,
    resource_id: str | None = None,
    before: float | None = None,
    owner: OwnerScope = ANY_OWNER,
) -> m.DeleteMany:
    """The ``DeleteMany`` of these filters (``ValueError`` without any)."""
    if status is None and task_type is None and resource_id is None and before is None:
        raise ValueError("delete_many needs at least one filter (status, task_type, ...)")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_DELETE:
        raise ValueError(f"limit must be an integer from 1 to {MAX_DELETE}")
    check_limit(min(limit, 200))
    if task_type is not None:
        check_task_type(task_type)
    statuses = check_statuses(status)
    terminal = frozenset(TERMINAL) if statuses is None else statuses & TERMINAL
    if before is not None:
        if isinstance(before, bool) or not isinstance(before, int | float):
            raise TypeError("before must be a number of seconds (Unix time)")
        if before != before or before in (float("inf"), float("-inf")):
            raise ValueError("before must be a finite Unix time")
        edge = before_cursor(before)
        cursor = edge if cursor is None else min(cursor, edge)
    if cursor is not None and not isinstance(cursor, str):
        raise TypeError("cursor must be a str")
    return m.DeleteMany(
        terminal, task_type, check_resource_id(resource_id), check_owner(owner), limit, cursor
    )
