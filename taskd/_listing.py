"""``Listing``: the tracker's reads and deletes over many tasks (``list``,
``list_page``, ``delete_many``, ``delete_page``), each one or a few commands to the
actor through ``Tracker._call``."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any, TypeVar

from ._args import (
    check_owner,
    check_resource_id,
    check_stage,
    check_statuses,
    check_task_id,
    check_task_type,
)
from ._checks import check_limit
from ._models import ANY_OWNER, OwnerScope, TaskRecord, TaskStatus
from .actor import messages as m
from .engine.bulk import MAX_DELETE, delete_message
from .handle import TaskPage

__all__ = ["Listing"]

R = TypeVar("R")


class Listing(ABC):
    """What ``Tracker`` answers over many tasks; it sends commands with ``_call``."""

    @abstractmethod
    def _call(self, msg: m.Request[R]) -> asyncio.Future[R]:
        """Send a command to the actor; the future gets its reply."""

    async def list(
        self,
        status: TaskStatus | str | Collection[TaskStatus | str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        limit: int = 50,
        *,
        owner: OwnerScope = ANY_OWNER,
        stage: str | None = None,
        parent_id: str | None = None,
    ) -> list[TaskRecord]:
        """Records newest first, filtered by status (one or several), type, resource,
        stage, parent (its children): the first ``limit`` matches."""
        check_limit(limit)
        found: list[TaskRecord] = []
        cursor: str | None = None
        while True:
            # A page may hold fewer than ``limit`` records and still have a next one:
            # the Redis engine bounds how far one call walks (docs/scale-out.md).
            page = await self.list_page(
                status=status,
                task_type=task_type,
                resource_id=resource_id,
                limit=limit - len(found),
                owner=owner,
                cursor=cursor,
                stage=stage,
                parent_id=parent_id,
            )
            found.extend(page.records)
            cursor = page.next_cursor
            if cursor is None or len(found) >= limit:
                return found

    async def list_page(
        self,
        *,
        status: TaskStatus | str | Collection[TaskStatus | str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        limit: int = 50,
        owner: OwnerScope = ANY_OWNER,
        cursor: str | None = None,
        stage: str | None = None,
        parent_id: str | None = None,
    ) -> TaskPage:
        """Like ``list``, one page at a time: pass the previous page's ``next_cursor``
        as ``cursor`` for the next one. Pages stay exact while tasks are created."""
        check_limit(limit)
        if task_type is not None:
            check_task_type(task_type)
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError("cursor must be a str")
        statuses, resource_id = check_statuses(status), check_resource_id(resource_id)
        if parent_id is not None:
            check_task_id(parent_id)
        msg = m.ListTasks(
            statuses, task_type, resource_id, check_owner(owner), limit, cursor,
            check_stage(stage), parent_id,
        )  # fmt: skip
        return await self._call(msg)

    async def delete_many(
        self,
        *,
        status: TaskStatus | str | Collection[TaskStatus | str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        before: float | None = None,
        owner: OwnerScope = ANY_OWNER,
    ) -> int:
        """Delete every terminal task matching the filters (at least one; ``before``:
        created before that Unix time), 1,000 per command; returns how many.
        Active tasks are never deleted (a status filter naming one matches none)."""
        total, cursor = 0, None
        while True:
            n, cursor = await self.delete_page(
                status=status, task_type=task_type, resource_id=resource_id, before=before,
                owner=owner, cursor=cursor,
            )  # fmt: skip
            total += n
            if cursor is None:
                return total

    async def delete_page(
        self, *, limit: int = MAX_DELETE, cursor: str | None = None, **filters: Any
    ) -> tuple[int, str | None]:
        """One command of ``delete_many`` (``filters`` are its): at most ``limit``
        deleted, and the cursor to go on from (None when nothing is left)."""
        msg = delete_message(limit, cursor, **filters)
        if not msg.statuses:  # only active statuses named: nothing can match
            return 0, None
        return await self._call(msg)
