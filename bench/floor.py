"""bench/floor.py: a minimal tracker, the floor bench/tracker.py measures taskd against.

What any tracker of spawned coroutines must do and nothing more: one id, one msgspec
record, three sorted indexes (all, by status, by type), a done callback that writes
the terminal record and moves the indexes, and an awaitable per task. No mailbox, no
validation, no counters, no retention, no subscribers: the distance from taskd to it
is what taskd's own machinery costs (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine, Generator
from typing import Any

import msgspec
from sortedcontainers import SortedList  # type: ignore[import-untyped]


class FloorRecord(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    task_type: str
    status: str
    created_at: float
    finished_at: float | None = None
    result: Any = None


class FloorHandle:
    """An awaitable per task: the coroutine's result once the record is terminal."""

    __slots__ = ("_fut",)

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self._fut = fut

    def __await__(self) -> Generator[Any, None, Any]:
        return self._fut.__await__()


class FloorTracker:
    def __init__(self) -> None:
        self.records: dict[str, FloorRecord] = {}
        self.all: SortedList = SortedList()
        self.by_status: dict[str, SortedList] = {}
        self.by_type: dict[str, SortedList] = {}
        self._ids = itertools.count()

    def _index(self, index: dict[str, SortedList], key: str) -> SortedList:
        ids = index.get(key)
        if ids is None:
            ids = index[key] = SortedList()
        return ids

    async def spawn(self, coro: Coroutine[Any, Any, Any], task_type: str) -> FloorHandle:
        task_id = f"{next(self._ids):013x}"
        rec = FloorRecord(task_id, task_type, "running", time.time())
        self.records[task_id] = rec
        self.all.add(task_id)
        self._index(self.by_status, "running").add(task_id)
        self._index(self.by_type, task_type).add(task_id)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        task = loop.create_task(coro)
        task.add_done_callback(lambda t: self._done(task_id, t, fut))
        return FloorHandle(fut)

    def _done(self, task_id: str, task: asyncio.Task[Any], fut: asyncio.Future[Any]) -> None:
        rec = self.records[task_id]
        if task.cancelled():
            status, value, exc = "cancelled", None, None
        else:
            exc = task.exception()
            status, value = ("failed", None) if exc is not None else ("completed", task.result())
        self.records[task_id] = msgspec.structs.replace(
            rec, status=status, finished_at=time.time(), result=value
        )
        self.by_status["running"].remove(task_id)
        self._index(self.by_status, status).add(task_id)
        if exc is not None:
            fut.set_exception(exc)
        elif status == "cancelled":
            fut.cancel()
        else:
            fut.set_result(value)
