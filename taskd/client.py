"""``TaskdClient``: an async client for the taskd HTTP API, built on aiohttp.

One method per route; records come back as ``taskd.TaskRecord``. Error envelopes
become the exception the server raised, rebuilt from the envelope's code and details
through the error table in ``taskd._errors``: ``TaskNotFound`` (404), ``TaskConflict``
(409 ``CONFLICT``, with ``task_id``, ``task_type`` and ``resource_id``),
``InvalidTransition`` (409 ``FAILED_PRECONDITION``), ``QuotaExceeded`` (429),
``TrackerFull``/``TrackerClosed``/``StoreError`` (503), and ``ApiError`` for the rest.
Every one carries ``.http_status``, ``.code`` and ``.retry_after``. A server that
cannot be reached raises ``ServerUnreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import aiohttp

from ._errors import TaskdError, error_from_wire
from ._models import JSON, TaskRecord

__all__ = ["ApiError", "ClientPage", "ServerUnreachable", "TaskdClient"]

DEFAULT_URL: Final = "http://127.0.0.1:8080"


class ApiError(TaskdError):
    """The server answered with an error envelope whose code has no exception class of
    its own (``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ...)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, JSON] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = self.http_status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def error_details(self) -> dict[str, str | int | float | bool | None] | None:  # noqa: D102
        return None if self.details is None else dict(self.details)  # type: ignore[arg-type]


class ServerUnreachable(TaskdError):
    """The server could not be reached (refused, reset, timed out)."""


@dataclass(frozen=True, slots=True)
class ClientPage:
    """One page of ``list``; pass ``next_page_token`` back for the next page."""

    records: tuple[TaskRecord, ...]
    next_page_token: str | None


def _filter_params(
    status: str | Sequence[str] | None, task_type: str | None, resource_id: str | None
) -> list[tuple[str, str]]:
    params = [("status", s) for s in ([status] if isinstance(status, str) else status or ())]
    if task_type is not None:
        params.append(("task_type", task_type))
    if resource_id is not None:
        params.append(("resource_id", resource_id))
    return params


def _json_or_none(raw: bytes) -> object:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return max(float(headers["Retry-After"]), 0.0)
    except (KeyError, ValueError):
        return None


class TaskdClient:
    """Talks to a taskd server. Use as ``async with TaskdClient(url) as client``.

    ``base_url`` is the server's (``http://127.0.0.1:8080``); the API's own URL, ending
    in ``prefix`` (``…/api/v1``), is accepted for it too."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        prefix: str = "/api/v1",
        request_timeout: float = 30.0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be a str or None")
        base = base_url.rstrip("/")
        if prefix and base.endswith(prefix.rstrip("/")):
            # The API's URL (http://host:8080/api/v1, as curl is given it) for the
            # server's: the routes are under it, /health and /metrics beside it.
            base = base[: -len(prefix.rstrip("/"))].rstrip("/")
        self.base_url = base
        self._api = self.base_url + prefix
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        #: The id of the last event ``events()`` yielded (for ``last_event_id=``).
        self.last_event_id: int | None = None

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

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        body: Mapping[str, object] | None = None,
        timeout: float | None = None,
        base: str | None = None,
    ) -> tuple[int, Mapping[str, str], object]:
        url = (base if base is not None else self._api) + path
        try:
            async with self._http().request(
                method,
                url,
                params=params,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
            ) as resp:
                raw = await resp.read()
                headers = dict(resp.headers)
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServerUnreachable(f"cannot reach taskd at {self.base_url}: {exc}") from exc
        data = _json_or_none(raw)
        if status >= 400:
            raise self._error(status, headers, data)
        return status, headers, data

    def _error(self, status: int, headers: Mapping[str, str], data: object) -> TaskdError:
        err = data.get("error") if isinstance(data, dict) else None
        retry = _retry_after(headers)
        if not isinstance(err, dict):
            return ApiError(status, "HTTP_ERROR", f"HTTP {status}", None, retry)
        code = str(err.get("code"))
        message = str(err.get("message"))
        details = err.get("details") if isinstance(err.get("details"), dict) else None
        exc = error_from_wire(code, message, details or {})
        if exc is None:
            return ApiError(status, code, message, details, retry)
        exc.retry_after = retry
        return exc

    @staticmethod
    def _record(data: object) -> TaskRecord:
        if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
            raise ApiError(200, "BAD_RESPONSE", "the server's answer is not a task record")
        return TaskRecord.from_dict(data["result"])

    # --- one method per route -----------------------------------------------------------

    async def health(self) -> bool:
        """True when ``GET /health`` answers ok."""
        _, _, data = await self._request("GET", "/health", base=self.base_url)
        return isinstance(data, dict) and data.get("status") == "ok"

    async def get(self, task_id: str) -> TaskRecord:
        """The task's record (``TaskNotFound`` if unknown, expired or another owner's)."""
        _, _, data = await self._request("GET", f"/tasks/{task_id}")
        return self._record(data)

    async def poll(self, task_id: str, wait: float) -> TaskRecord:
        """Long-poll: the record as soon as it is terminal, else after ``wait`` seconds."""
        _, _, data = await self._request(
            "GET", f"/tasks/{task_id}", params=[("wait", f"{wait:g}")], timeout=wait + 15
        )
        return self._record(data)

    async def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> ClientPage:
        """One page of tasks, newest first."""
        params = [("limit", str(limit)), *_filter_params(status, task_type, resource_id)]
        if page_token is not None:
            params.append(("page_token", page_token))
        _, _, data = await self._request("GET", "/tasks", params=params)
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise ApiError(200, "BAD_RESPONSE", "the server's answer is not a task list")
        token = data.get("next_page_token")
        return ClientPage(
            tuple(TaskRecord.from_dict(r) for r in data["result"]),
            token if isinstance(token, str) else None,
        )

    async def create(
        self,
        task_type: str,
        *,
        resource_id: str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        callback_url: str | None = None,
        heartbeat_timeout: float | None = None,
    ) -> TaskRecord:
        """Register an external task (``POST /tasks``)."""
        body: dict[str, object] = {"task_type": task_type}
        for key, value in (
            ("resource_id", resource_id),
            ("metadata", metadata),
            ("callback_url", callback_url),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if value is not None:
                body[key] = value
        _, _, data = await self._request("POST", "/tasks", body=body)
        return self._record(data)

    async def start(self, task_id: str) -> TaskRecord:
        """``POST /tasks/{id}/start``."""
        return self._record((await self._request("POST", f"/tasks/{task_id}/start"))[2])

    async def progress(
        self, task_id: str, progress: float | None = None, *, message: str | None = None
    ) -> TaskRecord:
        """``POST /tasks/{id}/progress``; the record's status says if cancellation was asked."""
        body: dict[str, object] = {}
        if progress is not None:
            body["progress"] = progress
        if message is not None:
            body["message"] = message
        return self._record(
            (await self._request("POST", f"/tasks/{task_id}/progress", body=body))[2]
        )

    async def complete(self, task_id: str, result: JSON = None) -> TaskRecord:
        """``POST /tasks/{id}/complete``."""
        body = {"result": result}
        return self._record(
            (await self._request("POST", f"/tasks/{task_id}/complete", body=body))[2]
        )

    async def fail(self, task_id: str, error: str) -> TaskRecord:
        """``POST /tasks/{id}/fail`` (the server redacts ``error``)."""
        body = {"error": error}
        return self._record((await self._request("POST", f"/tasks/{task_id}/fail", body=body))[2])

    async def cancel(self, task_id: str) -> TaskRecord:
        """``POST /tasks/{id}/cancel``: the record, ``cancelling`` or ``cancelled``."""
        return self._record((await self._request("POST", f"/tasks/{task_id}/cancel"))[2])

    async def delete(self, task_id: str) -> None:
        """``DELETE /tasks/{id}`` (terminal tasks only)."""
        await self._request("DELETE", f"/tasks/{task_id}")

    async def openapi(self) -> dict[str, object]:
        """The server's OpenAPI document."""
        _, _, data = await self._request("GET", "/openapi.json")
        if not isinstance(data, dict):
            raise ApiError(200, "BAD_RESPONSE", "the OpenAPI document is not an object")
        return data

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
        path = f"/tasks/{task_id}/events" if task_id is not None else "/events"
        params = [] if task_id is not None else _filter_params(status, task_type, resource_id)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        try:
            async with self._http().get(
                self._api + path,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    raise self._error(resp.status, dict(resp.headers), _json_or_none(raw))
                if resp.status == 204:
                    return
                data: list[str] = []
                event_id: str | None = None
                async for raw_line in resp.content:
                    line = raw_line.decode().rstrip("\r\n")
                    if not line:
                        if data:
                            if event_id is not None and event_id.isdigit():
                                self.last_event_id = int(event_id)
                            yield TaskRecord.from_dict(json.loads("\n".join(data)))
                        data, event_id = [], None
                    elif line.startswith(":"):
                        continue  # keep-alive ping
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "data":
                            data.append(value)
                        elif name == "id":
                            event_id = value
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
        deadline = None if timeout is None else loop.time() + timeout
        backoff = 0.25
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g} seconds")
            wait = step if remaining is None else max(min(step, remaining), 0.001)
            try:
                rec = await self.poll(task_id, wait)
            except ServerUnreachable:
                pause = backoff
            except TaskdError as exc:
                if exc.http_status != 503:
                    raise
                pause = exc.retry_after if exc.retry_after is not None else backoff
            else:
                yield rec
                if rec.is_terminal:
                    return
                backoff = 0.25
                continue
            backoff = min(backoff * 2, 5.0)
            if remaining is not None:
                pause = min(pause, max(remaining, 0))
            await asyncio.sleep(pause)

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
