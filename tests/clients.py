"""Both Python clients behind one async face, so the client tests run on each:
``TaskdClient`` as it is, ``SyncTaskdClient`` with every call run in a thread (as a
Django view or a Celery worker would block on it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

from taskd.client import SyncTaskdClient, TaskdClient

_DONE = object()


class SyncInThreads:
    """A ``SyncTaskdClient`` whose methods are awaited: each call runs in a thread;
    ``events`` and ``follow`` step their generator in one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = SyncTaskdClient(*args, **kwargs)

    async def __aenter__(self) -> SyncInThreads:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.sync.close)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sync, name)
        if not callable(attr):
            return attr
        if name in ("events", "follow"):
            return lambda *a, **kw: _stepped(attr(*a, **kw))

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attr, *args, **kwargs)

        return call


async def _stepped(gen: Iterator[Any]) -> AsyncIterator[Any]:
    try:
        while True:
            item = await asyncio.to_thread(next, gen, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


#: What the ``make_client`` fixture gives: a factory taking TaskdClient's arguments.
MakeClient = Callable[..., Any]

CLIENTS: dict[str, MakeClient] = {"async": TaskdClient, "sync": SyncInThreads}
