"""``TaskdClient``: the async client, on aiohttp (the routes, errors and retry rules
are ``_calls``'s, shared with ``SyncTaskdClient``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import aiohttp

from .._errors import TaskdError
from .._models import JSON, TaskRecord
from . import _calls as c
from ._calls import Base, Call, ClientPage, EventParser, Following, ServerUnreachable

__all__ = ["TaskdClient"]

T = TypeVar("T")


class TaskdClient(Base):
    """Talks to a taskd server. Use as ``async with TaskdClient(url) as client``.

    ``base_url`` is the server's (``http://127.0.0.1:8080``); the API's own URL, ending
    in ``prefix`` (``…/api/v1``), is accepted for it too."""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TaskdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the underlying HTTP session; idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def _do(self, call: Call[T]) -> T:
        body = call.body
        try:
            async with self._http().request(
                call.method,
                self._url(call),
                params=call.params or None,
                data=None if body is None else json.dumps(body),
                headers=_headers(call),
                timeout=aiohttp.ClientTimeout(total=call.timeout or self._timeout),
            ) as resp:
                raw = await resp.read()
                return self._answer(call, resp.status, resp.headers, raw)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServerUnreachable(f"cannot reach taskd at {self.base_url}: {exc}") from exc

    # --- one method per route -----------------------------------------------------------

    async def health(self) -> bool:
        """True when ``GET /health`` answers ok."""
        return await self._do(c.health())

    async def get(self, task_id: str) -> TaskRecord:
        """The task's record (``TaskNotFound`` if unknown, expired or another owner's)."""
        return await self._do(c.get(task_id))

    async def poll(self, task_id: str, wait: float) -> TaskRecord:
        """Long-poll: the record as soon as it is terminal, else after ``wait`` seconds."""
        return await self._do(c.poll(task_id, wait))

    async def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
        stage: str | None = None,
        parent_id: str | None = None,
    ) -> ClientPage:
        """One page of tasks, newest first (``parent_id``: that task's children)."""
        return await self._do(
            c.list_page(status, task_type, resource_id, limit, page_token, stage, parent_id)
        )

    async def create(
        self,
        task_type: str,
        *,
        resource_id: str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        callback_url: str | None = None,
        heartbeat_timeout: float | None = None,
        parent_id: str | None = None,
        await_children: bool = False,
    ) -> TaskRecord:
        """Register an external task (``POST /tasks``); ``parent_id`` and
        ``await_children`` as ``Tracker.create`` (docs/trees.md)."""
        call = c.create(
            task_type, resource_id, metadata, callback_url, heartbeat_timeout, parent_id,
            await_children,
        )  # fmt: skip
        return await self._do(call)

    async def start(self, task_id: str) -> TaskRecord:
        """``POST /tasks/{id}/start``."""
        return await self._do(c.action(task_id, "start"))

    async def progress(
        self,
        task_id: str,
        progress: float | None = None,
        *,
        message: str | None = None,
        stage: str | None = None,
    ) -> TaskRecord:
        """``POST /tasks/{id}/progress``; the record's status says if cancellation was asked."""
        return await self._do(c.progress(task_id, progress, message, stage))

    async def complete(self, task_id: str, result: JSON = None) -> TaskRecord:
        """``POST /tasks/{id}/complete``."""
        return await self._do(c.action(task_id, "complete", {"result": result}))

    async def fail(self, task_id: str, error: str) -> TaskRecord:
        """``POST /tasks/{id}/fail`` (the server redacts ``error``)."""
        return await self._do(c.action(task_id, "fail", {"error": error}))

    async def cancel(self, task_id: str, *, confirm: bool = False) -> TaskRecord:
        """``POST /tasks/{id}/cancel``: the record, ``cancelling`` or ``cancelled``
        (as it is when it was already: idempotent); ``confirm=True``, a worker
        acknowledging a cancel: ``cancelled``."""
        return await self._do(c.cancel(task_id, confirm))

    async def delete(self, task_id: str) -> None:
        """``DELETE /tasks/{id}`` (terminal tasks only)."""
        await self._do(c.delete(task_id))

    async def delete_many(
        self,
        *,
        status: str | Sequence[str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        before: float | None = None,
    ) -> int:
        """``DELETE /tasks`` with filters (one at least), call after call until nothing
        is left: how many terminal tasks were deleted."""
        total, token = 0, None
        while True:
            call = c.delete_page(status, task_type, resource_id, before, token)
            deleted, token = await self._do(call)
            total += deleted
            if token is None:
                return total

    async def openapi(self) -> dict[str, object]:
        """The server's OpenAPI document."""
        return await self._do(c.openapi())

    async def events(
        self,
        task_id: str | None = None,
        *,
        status: str | Sequence[str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        last_event_id: int | None = None,
    ) -> AsyncIterator[TaskRecord]:
        """Follow Server-Sent Events: one task's (current state first, ends after the
        terminal one) or, without ``task_id``, every visible change, filtered. The id
        of the last event seen is kept in ``self.last_event_id`` for resuming."""
        url, params, headers = self._events_call(
            task_id, status, task_type, resource_id, last_event_id
        )
        parser = EventParser()
        try:
            async with self._http().get(
                url,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
            ) as resp:
                if resp.status >= 400:
                    raise c.error_of(resp.status, resp.headers, await resp.read())
                if resp.status == 204:
                    return
                async for raw_line in resp.content:
                    rec = parser.line(raw_line.decode())
                    if rec is not None:
                        self.last_event_id = parser.last_event_id
                        yield rec
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachable(f"lost the event stream from {self.base_url}: {exc}") from exc

    async def follow(
        self, task_id: str, *, timeout: float | None = None, step: float = 30.0
    ) -> AsyncGenerator[TaskRecord, None]:
        """Yield the task's record after each long-poll of up to ``step`` seconds, until
        and including the terminal one. Rides out server restarts and 503s: while the
        server is unreachable or unavailable it retries, honouring ``Retry-After`` or
        backing off up to 5 s. ``TimeoutError`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        rules = Following(task_id, timeout, step)
        rules.start(loop.time())
        while True:
            try:
                rec = await self.poll(task_id, rules.wait(loop.time()))
            except TaskdError as exc:  # (ServerUnreachable is one)
                await asyncio.sleep(rules.pause(exc, loop.time()))
                continue
            yield rec
            if rec.is_terminal:
                return
            rules.answered()

    async def wait(
        self, task_id: str, timeout: float | None = None, *, poll_wait: float = 30.0
    ) -> TaskRecord:
        """The terminal record, by long-polling (see ``follow``). ``TimeoutError`` after
        ``timeout`` seconds."""
        async with contextlib.aclosing(
            self.follow(task_id, timeout=timeout, step=poll_wait)
        ) as records:
            async for rec in records:
                if rec.is_terminal:
                    return rec
        raise AssertionError("follow() ends with the terminal record")  # pragma: no cover


def _headers(call: Call[T]) -> dict[str, str] | None:
    headers = dict(call.headers or {})
    if call.body is not None:
        headers["Content-Type"] = "application/json"
    return headers or None
