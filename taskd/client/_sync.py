"""``SyncTaskdClient``: the blocking client, on httpx, for code that is not async (a
Django or Flask view, a Celery or RQ worker, a script). The routes, errors and retry
rules are ``_calls``'s, shared with ``TaskdClient``: same methods, same answers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import httpx

from .._errors import TaskdError
from .._models import JSON, TaskRecord
from . import _calls as c
from ._calls import Base, Call, ClientPage, EventParser, Following, ServerUnreachable

__all__ = ["SyncTaskdClient"]

T = TypeVar("T")


class SyncTaskdClient(Base):
    """Talks to a taskd server, blocking. Use as ``with SyncTaskdClient(url) as
    client``; one client may be shared by threads (httpx's client is thread-safe).

    ``base_url`` is the server's (``http://127.0.0.1:8080``); the API's own URL, ending
    in ``prefix`` (``…/api/v1``), is accepted for it too."""

    _client: httpx.Client | None = None

    def __enter__(self) -> SyncTaskdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HTTP client; idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(headers=self._headers)
        return self._client

    def _do(self, call: Call[T]) -> T:
        try:
            resp = self._http().request(
                call.method,
                self._url(call),
                params=list(call.params) or None,
                json=call.body,
                headers=call.headers,
                timeout=call.timeout or self._timeout,
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach taskd at {self.base_url}: {exc}") from exc
        return self._answer(call, resp.status_code, resp.headers, resp.content)

    # --- one method per route -----------------------------------------------------------

    def health(self) -> bool:
        """True when ``GET /health`` answers ok."""
        return self._do(c.health())

    def get(self, task_id: str) -> TaskRecord:
        """The task's record (``TaskNotFound`` if unknown, expired or another owner's)."""
        return self._do(c.get(task_id))

    def poll(self, task_id: str, wait: float) -> TaskRecord:
        """Long-poll: the record as soon as it is terminal, else after ``wait`` seconds."""
        return self._do(c.poll(task_id, wait))

    def list(
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
        return self._do(
            c.list_page(status, task_type, resource_id, limit, page_token, stage, parent_id)
        )

    def create(
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
        return self._do(call)

    def start(self, task_id: str) -> TaskRecord:
        """``POST /tasks/{id}/start``."""
        return self._do(c.action(task_id, "start"))

    def progress(
        self,
        task_id: str,
        progress: float | None = None,
        *,
        message: str | None = None,
        stage: str | None = None,
    ) -> TaskRecord:
        """``POST /tasks/{id}/progress``; the record's status says if cancellation was asked."""
        return self._do(c.progress(task_id, progress, message, stage))

    def complete(self, task_id: str, result: JSON = None) -> TaskRecord:
        """``POST /tasks/{id}/complete``."""
        return self._do(c.action(task_id, "complete", {"result": result}))

    def fail(self, task_id: str, error: str) -> TaskRecord:
        """``POST /tasks/{id}/fail`` (the server redacts ``error``)."""
        return self._do(c.action(task_id, "fail", {"error": error}))

    def cancel(self, task_id: str, *, confirm: bool = False) -> TaskRecord:
        """``POST /tasks/{id}/cancel``: the record, ``cancelling`` or ``cancelled``
        (as it is when it was already: idempotent); ``confirm=True``, a worker
        acknowledging a cancel: ``cancelled``."""
        return self._do(c.cancel(task_id, confirm))

    def delete(self, task_id: str) -> None:
        """``DELETE /tasks/{id}`` (terminal tasks only)."""
        self._do(c.delete(task_id))

    def delete_many(
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
            deleted, token = self._do(call)
            total += deleted
            if token is None:
                return total

    def openapi(self) -> dict[str, object]:
        """The server's OpenAPI document."""
        return self._do(c.openapi())

    def events(
        self,
        task_id: str | None = None,
        *,
        status: str | Sequence[str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        last_event_id: int | None = None,
    ) -> Iterator[TaskRecord]:
        """Follow Server-Sent Events: one task's (current state first, ends after the
        terminal one) or, without ``task_id``, every visible change, filtered. The id
        of the last event seen is kept in ``self.last_event_id`` for resuming."""
        url, params, headers = self._events_call(
            task_id, status, task_type, resource_id, last_event_id
        )
        parser = EventParser()
        timeout = httpx.Timeout(None, connect=self._timeout)
        try:
            with self._http().stream(
                "GET", url, params=tuple(params), headers=headers, timeout=timeout
            ) as resp:
                if resp.status_code >= 400:
                    raise c.error_of(resp.status_code, resp.headers, resp.read())
                if resp.status_code == 204:
                    return
                for line in resp.iter_lines():
                    rec = parser.line(line)
                    if rec is not None:
                        self.last_event_id = parser.last_event_id
                        yield rec
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"lost the event stream from {self.base_url}: {exc}") from exc

    def follow(
        self, task_id: str, *, timeout: float | None = None, step: float = 30.0
    ) -> Generator[TaskRecord, None, None]:
        """Yield the task's record after each long-poll of up to ``step`` seconds, until
        and including the terminal one. Rides out server restarts and 503s: while the
        server is unreachable or unavailable it retries, honouring ``Retry-After`` or
        backing off up to 5 s. ``TimeoutError`` after ``timeout`` seconds."""
        rules = Following(task_id, timeout, step)
        rules.start(time.monotonic())
        while True:
            try:
                rec = self.poll(task_id, rules.wait(time.monotonic()))
            except TaskdError as exc:  # (ServerUnreachable is one)
                time.sleep(rules.pause(exc, time.monotonic()))
                continue
            yield rec
            if rec.is_terminal:
                return
            rules.answered()

    def wait(
        self, task_id: str, timeout: float | None = None, *, poll_wait: float = 30.0
    ) -> TaskRecord:
        """The terminal record, by long-polling (see ``follow``). ``TimeoutError`` after
        ``timeout`` seconds."""
        with contextlib.closing(self.follow(task_id, timeout=timeout, step=poll_wait)) as records:
            for rec in records:
                if rec.is_terminal:
                    return rec
        raise AssertionError("follow() ends with the terminal record")  # pragma: no cover
