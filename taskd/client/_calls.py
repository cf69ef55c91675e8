"""What both clients share, with no I/O: each route as a ``Call`` (method, path,
parameters, body) with the function that reads its answer; error envelopes rebuilt
as exceptions; the long-poll loop's retry rules (``Following``); the event stream's
parser (``EventParser``). ``TaskdClient`` (aiohttp) and ``SyncTaskdClient`` (httpx)
only send calls and read bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from .._errors import TaskdError, error_from_wire
from .._models import JSON, TaskRecord
from .._tracing import current_traceparent

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "Call",
    "ClientPage",
    "EventParser",
    "Following",
    "ServerUnreachable",
]

DEFAULT_URL: Final = "http://127.0.0.1:8080"
T = TypeVar("T")


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

    def error_details(self) -> dict[str, str | int | float | bool | None] | None:
        return None if self.details is None else dict(self.details)  # type: ignore[arg-type]


class ServerUnreachable(TaskdError):
    """The server could not be reached (refused, reset, timed out)."""


@dataclass(frozen=True, slots=True)
class ClientPage:
    """One page of ``list``; pass ``next_page_token`` back for the next page."""

    records: tuple[TaskRecord, ...]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request: ``path`` under the API (or, with ``server``, under the server's
    base URL), and ``read`` turning the answer's JSON into the method's result."""

    method: str
    path: str
    read: Callable[[object], T]
    params: Sequence[tuple[str, str]] = ()
    body: Mapping[str, object] | None = None
    timeout: float | None = None
    server: bool = False
    headers: Mapping[str, str] | None = None


class Base:
    """The clients' common part: the URLs, the token, and the routes as ``Call``s."""

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
        #: The id of the last event ``events()`` yielded (for ``last_event_id=``).
        self.last_event_id: int | None = None

    def _url(self, call: Call[T]) -> str:
        return (self.base_url if call.server else self._api) + call.path

    def _answer(self, call: Call[T], status: int, headers: Mapping[str, str], raw: bytes) -> T:
        data = _json_or_none(raw)
        if status >= 400:
            raise error(status, headers, data)
        return call.read(data)

    def _events_call(
        self,
        task_id: str | None,
        status: str | Sequence[str] | None,
        task_type: str | None,
        resource_id: str | None,
        last_event_id: int | None,
    ) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
        path = f"/tasks/{task_id}/events" if task_id is not None else "/events"
        params = [] if task_id is not None else _filter_params(status, task_type, resource_id)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        return self._api + path, params, headers


# --- the routes ---------------------------------------------------------------------------


def health() -> Call[bool]:
    return Call(
        "GET", "/health", lambda d: isinstance(d, dict) and d.get("status") == "ok", server=True
    )


def get(task_id: str) -> Call[TaskRecord]:
    return Call("GET", f"/tasks/{task_id}", record)


def poll(task_id: str, wait: float) -> Call[TaskRecord]:
    return Call("GET", f"/tasks/{task_id}", record, [("wait", f"{wait:g}")], timeout=wait + 15)


def list_page(
    status: str | Sequence[str] | None,
    task_type: str | None,
    resource_id: str | None,
    limit: int,
    page_token: str | None,
    stage: str | None = None,
    parent_id: str | None = None,
) -> Call[ClientPage]:
    params = [("limit", str(limit)), *_filter_params(status, task_type, resource_id)]
    if stage is not None:
        params.append(("stage", stage))
    if parent_id is not None:
        params.append(("parent_id", parent_id))
    if page_token is not None:
        params.append(("page_token", page_token))
    return Call("GET", "/tasks", _page, params)


def create(
    task_type: str,
    resource_id: str | None,
    metadata: Mapping[str, JSON] | None,
    callback_url: str | None,
    heartbeat_timeout: float | None,
    parent_id: str | None = None,
    await_children: bool = False,
) -> Call[TaskRecord]:
    body: dict[str, object] = {"task_type": task_type}
    for key, value in (
        ("resource_id", resource_id),
        ("metadata", metadata),
        ("callback_url", callback_url),
        ("heartbeat_timeout", heartbeat_timeout),
        ("parent_id", parent_id),
        ("await_children", await_children or None),
    ):
        if value is not None:
            body[key] = value
    # The span current here becomes the task span's parent (docs/tracing.md).
    traceparent = current_traceparent()
    headers = None if traceparent is None else {"traceparent": traceparent}
    return Call("POST", "/tasks", record, body=body, headers=headers)


def action(task_id: str, verb: str, body: Mapping[str, object] | None = None) -> Call[TaskRecord]:
    """``POST /tasks/{id}/{verb}``: start, progress, complete, fail, cancel."""
    return Call("POST", f"/tasks/{task_id}/{verb}", record, body=body)


def progress(
    task_id: str, fraction: float | None, message: str | None, stage: str | None = None
) -> Call[TaskRecord]:
    body: dict[str, object] = {}
    if fraction is not None:
        body["progress"] = fraction
    if message is not None:
        body["message"] = message
    if stage is not None:
        body["stage"] = stage
    return action(task_id, "progress", body)


def cancel(task_id: str, confirm: bool) -> Call[TaskRecord]:
    return action(task_id, "cancel", {"confirm": True} if confirm else None)


def delete(task_id: str) -> Call[None]:
    return Call("DELETE", f"/tasks/{task_id}", lambda d: None)


def delete_page(
    status: str | Sequence[str] | None,
    task_type: str | None,
    resource_id: str | None,
    before: float | None,
    page_token: str | None,
) -> Call[tuple[int, str | None]]:
    """``DELETE /tasks`` with filters: how many were deleted, and the next token."""
    params = _filter_params(status, task_type, resource_id)
    if before is not None:
        params.append(("before", repr(float(before))))
    if page_token is not None:
        params.append(("page_token", page_token))
    return Call("DELETE", "/tasks", _deleted, params)


def _deleted(data: object) -> tuple[int, str | None]:
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, dict) or not isinstance(result.get("deleted"), int):
        raise ApiError(200, "BAD_RESPONSE", "the server's answer is not a delete count")
    assert isinstance(data, dict)
    token = data.get("next_page_token")
    return result["deleted"], token if isinstance(token, str) else None


def openapi() -> Call[dict[str, object]]:
    return Call("GET", "/openapi.json", _document)


# --- answers ------------------------------------------------------------------------------


def record(data: object) -> TaskRecord:
    """A record answer's record."""
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        raise ApiError(200, "BAD_RESPONSE", "the server's answer is not a task record")
    return TaskRecord.from_dict(data["result"])


def _page(data: object) -> ClientPage:
    if not isinstance(data, dict) or not isinstance(data.get("result"), list):
        raise ApiError(200, "BAD_RESPONSE", "the server's answer is not a task list")
    token = data.get("next_page_token")
    return ClientPage(
        tuple(TaskRecord.from_dict(r) for r in data["result"]),
        token if isinstance(token, str) else None,
    )


def _document(data: object) -> dict[str, object]:
    if not isinstance(data, dict):
        raise ApiError(200, "BAD_RESPONSE", "the OpenAPI document is not an object")
    return data


def error(status: int, headers: Mapping[str, str], data: object) -> TaskdError:
    """The exception an error answer stands for (the server's own class, rebuilt
    from the envelope's code and details, else ``ApiError``)."""
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


def error_of(status: int, headers: Mapping[str, str], raw: bytes) -> TaskdError:
    """``error`` for an answer's raw body."""
    return error(status, headers, _json_or_none(raw))


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
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return None if value is None else max(float(value), 0.0)
    except ValueError:
        return None


# --- the long-poll loop and the event stream ------------------------------------------------


@dataclass(slots=True)
class Following:
    """``follow``'s rules: how long each long-poll waits, and how long to pause after
    a failure (``Retry-After`` on a 503, else a back-off doubling up to 5 s), until
    ``timeout``. Both clients run the same loop around it."""

    task_id: str
    timeout: float | None
    step: float
    deadline: float | None = None
    backoff: float = 0.25

    def start(self, now: float) -> None:
        """The loop starts at ``now``."""
        self.deadline = None if self.timeout is None else now + self.timeout

    def remaining(self, now: float) -> float | None:
        """Seconds left (None: no timeout); ``TimeoutError`` once they are spent."""
        if self.deadline is None:
            return None
        left = self.deadline - now
        if left <= 0:
            assert self.timeout is not None
            raise TimeoutError(
                f"task {self.task_id} did not finish within {self.timeout:g} seconds"
            )
        return left

    def wait(self, now: float) -> float:
        """The next long-poll's wait."""
        left = self.remaining(now)
        return self.step if left is None else max(min(self.step, left), 0.001)

    def answered(self) -> None:
        """A record came back: the back-off starts again."""
        self.backoff = 0.25

    def pause(self, exc: Exception, now: float) -> float:
        """How long to pause after ``exc``; re-raises what is not worth a retry."""
        if isinstance(exc, ServerUnreachable):
            pause = self.backoff
        elif isinstance(exc, TaskdError) and exc.http_status == 503:
            pause = exc.retry_after if exc.retry_after is not None else self.backoff
        else:
            raise exc
        self.backoff = min(self.backoff * 2, 5.0)
        left = self.remaining(now)
        return pause if left is None else min(pause, max(left, 0))


@dataclass(slots=True)
class EventParser:
    """Server-Sent Events, one line at a time: ``line`` returns a record when an event
    ends, and keeps the last event's id."""

    last_event_id: int | None = None
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def line(self, raw: str) -> TaskRecord | None:
        """Feed one line (without its line ending)."""
        line = raw.rstrip("\r\n")
        if not line:
            data, event_id = self._data, self._id
            self._data, self._id = [], None
            if not data:
                return None
            if event_id is not None and event_id.isdigit():
                self.last_event_id = int(event_id)
            return TaskRecord.from_dict(json.loads("\n".join(data)))
        if line.startswith(":"):
            return None  # keep-alive ping
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None
