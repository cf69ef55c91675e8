"""aiohttp integration: ``setup(app)``, the task routes of the HTTP API, ``create_app``.

The handlers only translate: parse and check the request, send one message through
the tracker, render the reply. One middleware maps taskd's errors and aiohttp's HTTP
errors to the error envelope, so no request gets a 500 or a traceback.

State lives under a ``web.AppKey`` and is read through ``request.config_dict``, so
``get_tracker`` works from sub-applications too (aiojobs' pattern).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from . import _metrics, _openapi
from ._errors import CODE_FOR_STATUS, TaskdError, TaskNotFound
from ._models import (
    JSON,
    TaskRecord,
    TaskStatus,
    check_resource_id,
    check_seconds,
    check_task_type,
    check_unicode,
    parse_statuses,
)
from ._retention import Retention
from ._store import Store
from ._tracker import MAX_LIMIT, TaskHandle, Tracker
from ._watch import Subscription
from ._webhooks import Webhooks

__all__ = [
    "AuthCallback",
    "BrowserGuard",
    "RequestError",
    "accepted",
    "bearer_auth",
    "create_app",
    "error_response",
    "get_tracker",
    "setup",
    "spawn",
]

log = logging.getLogger("taskd.web")
T = TypeVar("T")

#: ``auth(request)`` returns the caller's owner string or raises ``HTTPUnauthorized``;
#: it may be a plain function or a coroutine function.
AuthCallback = Callable[[web.Request], "str | Awaitable[str]"]

MAX_WAIT: Final = 60.0
SSE_BUFFER: Final = 256
SSE_SEND_TIMEOUT: Final = 30.0
MAX_BODY: Final = 1024 * 1024
RETRY_AFTER: Final = "1"
_JSON: Final = "application/json"
_RENDER_CACHE_SIZE: Final = 4096
#: The render cache holds at most this many bytes (a record over 1/8 of it is never kept).
_RENDER_CACHE_BYTES: Final = 32 * 1024 * 1024


# --- state ----------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    tracker: Tracker
    prefix: str
    auth: AuthCallback | None
    max_wait: float
    sse_ping_interval: float
    #: (method, route, status) -> requests served; None unless metrics are exported.
    http_counts: dict[tuple[str, str, int], int] | None = None
    #: The application setup() was called on (maybe mounted as a sub-application).
    app: web.Application | None = None
    #: The resources of taskd's own routes, for telling them from the host's.
    resources: set[web.AbstractResource] = field(default_factory=set)
    _base: str | None = None
    #: Open event streams, ended on shutdown so that the server need not wait for them.
    streams: set[Subscription] = field(default_factory=set)
    # task_id -> (record, its rendered JSON), oldest first.
    rendered: OrderedDict[str, tuple[TaskRecord, bytes]] = field(default_factory=OrderedDict)
    rendered_bytes: int = 0

    def api_base(self) -> str:
        """The API's path as mounted (``/svc/api/v1`` inside a sub-application at
        ``/svc``): read from the router, which adds a sub-application's prefix to its
        resources when it is mounted. Computed once the application runs."""
        if self._base is None:
            assert self.app is not None
            url = self.app.router[_ROUTE_LIST].url_for().path
            base = url[: -len("/tasks")]
            if not self.app.frozen:
                return base  # mounting may still change it: do not cache yet
            self._base = base
        return self._base

    def task_url(self, task_id: str) -> str:
        """The task's URL path, as mounted."""
        return f"{self.api_base()}/tasks/{task_id}"

    def render(self, rec: TaskRecord) -> bytes:
        """The record's JSON, rendered once per record version (records are
        immutable). The cache is keyed by task id, so a task holds one entry, and
        bounded in bytes, oldest first; a deleted task's entry is dropped."""
        cache = self.rendered
        hit = cache.get(rec.task_id)
        if hit is not None and hit[0] is rec:
            return hit[1]
        body = rec.to_json().encode()
        if hit is not None:
            del cache[rec.task_id]
            self.rendered_bytes -= len(hit[1])
        if len(body) <= _RENDER_CACHE_BYTES // 8:
            cache[rec.task_id] = (rec, body)
            self.rendered_bytes += len(body)
            while self.rendered_bytes > _RENDER_CACHE_BYTES or len(cache) > _RENDER_CACHE_SIZE:
                _, (_, old) = cache.popitem(last=False)
                self.rendered_bytes -= len(old)
        return body

    def forget(self, task_id: str) -> None:
        """Drop a deleted task's rendering."""
        hit = self.rendered.pop(task_id, None)
        if hit is not None:
            self.rendered_bytes -= len(hit[1])


_STATE: Final = web.AppKey("taskd_state", _State)
_ROUTE_LIST: Final = "taskd-tasks"
_OWNER: Final = web.RequestKey("taskd_owner", object)
_NO_OWNER: Final = object()


def _state_of(obj: web.Request | web.Application) -> _State:
    mapping = obj.config_dict if isinstance(obj, web.Request) else obj
    try:
        return mapping[_STATE]
    except KeyError:
        raise RuntimeError(
            "taskd is not set up on this application: call taskd.web.setup(app) first"
        ) from None


def get_tracker(request_or_app: web.Request | web.Application) -> Tracker:
    """The tracker ``setup`` installed (found from sub-applications too).

    Raises ``RuntimeError`` if ``setup`` was not called on the application.
    """
    return _state_of(request_or_app).tracker


# --- errors -----------------------------------------------------------------------------


class RequestError(Exception):
    """Raised by a handler to answer with the error envelope: HTTP status, code,
    message, details (and extra headers). taskd's own exceptions need no wrapping: the
    middleware answers them from the error table in ``taskd._errors``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, JSON] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def _invalid(message: str, **details: JSON) -> RequestError:
    return RequestError(400, "INVALID_ARGUMENT", message, details or None)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, JSON] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The error envelope as a response."""
    body = {"status": "error", "error": {"code": code, "message": message, "details": details}}
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type=_JSON,
        headers=headers,
    )


def _from_taskd_error(exc: TaskdError) -> RequestError:
    headers = {"Retry-After": RETRY_AFTER} if exc.http_status in (429, 503) else None
    return RequestError(exc.http_status, exc.code, str(exc), exc.error_details(), headers)


def _in_api(request: web.Request) -> bool:
    """Whether the request is for taskd's own routes. Judged by the route the request
    matched (its resource is one setup() registered), or, for a path that matched no
    route or no method, by the API's mount point as the router resolves it, which
    includes the prefix of a sub-application."""
    state = request.config_dict.get(_STATE)
    if state is None:
        return False
    resource = request.match_info.route.resource
    if resource is not None:
        return resource in state.resources
    base = state.api_base()
    path = request.path
    return path == base or path.startswith(base + "/")


def _make_middleware(state: _State) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The one middleware: errors to envelopes, and per-route request counts when the
    app exports metrics (the standalone app)."""
    counts = state.http_counts

    @web.middleware
    async def taskd_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Exception as exc:
            response = _error_to_response(request, exc)
        if counts is not None:
            route = request.match_info.route.resource
            key = (
                request.method,
                route.canonical if route is not None else "(unmatched)",
                response.status,
            )
            counts[key] = counts.get(key, 0) + 1
        return response

    return taskd_middleware


class _ClientGone(Exception):
    """The client disconnected before its request was read: answer nothing."""


def _error_to_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Answer an error under the API prefix with the envelope; taskd's own errors raised
    from the application's handlers (``taskd.web.spawn``) get it too. Anything else
    outside the prefix is re-raised for aiohttp to handle as usual."""
    if isinstance(exc, RequestError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    if isinstance(exc, _ClientGone):
        return error_response(400, "INVALID_ARGUMENT", "request body incomplete")
    if isinstance(exc, TaskdError):
        err = _from_taskd_error(exc)
        return error_response(err.status, err.code, err.message, err.details, err.headers)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or not _in_api(request):
            raise exc
        code = CODE_FOR_STATUS.get(
            exc.status, "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL"
        )
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return error_response(exc.status, code, exc.reason, None, headers)
    if not _in_api(request):
        raise exc
    if isinstance(exc, ValueError | TypeError):
        # The tracker's argument checks: the request carried a bad value.
        return error_response(400, "INVALID_ARGUMENT", str(exc))
    # A bug of ours: log it, but never leak a traceback to the client.
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "INTERNAL", "internal error")


# --- browsers: cross-site requests and DNS rebinding ---------------------------------------

_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_CORS_HEADERS: Final = "Authorization, Content-Type, Last-Event-ID"


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header value (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def is_loopback(name: str) -> bool:
    """Whether a host name or address is loopback (``localhost`` included)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class BrowserGuard:
    """What the standalone server accepts from browsers.

    ``check_host``: accept only ``Host`` values that are loopback names or addresses,
    or listed in ``allowed_hosts`` (the server's own ``--host`` among them): a defence
    against DNS rebinding, for servers that answer anyone who reaches them (no
    tokens). ``cors_origins``: foreign origins allowed to make unsafe requests (and
    given CORS headers); any other foreign ``Origin`` — or ``Sec-Fetch-Site:
    cross-site`` — on a POST, PUT, PATCH or DELETE gets 403 ``PERMISSION_DENIED``.
    Clients that send no ``Origin`` (curl, the CLI, SDKs) are not affected.
    """

    check_host: bool = True
    allowed_hosts: frozenset[str] = frozenset()
    cors_origins: frozenset[str] = frozenset()

    def host_allowed(self, host: str) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        name = _host_name(host)
        return is_loopback(name) or name in self.allowed_hosts

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """The middleware that applies the guard (outermost)."""
        guard = self

        @web.middleware
        async def browser_guard(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            if (
                guard.check_host
                and request.path != "/health"
                and not guard.host_allowed(request.host)
            ):
                return error_response(
                    403,
                    "PERMISSION_DENIED",
                    "this Host is not allowed (taskd serve --allow-host)",
                )
            origin = request.headers.get("Origin")
            listed = origin is not None and origin in guard.cors_origins
            if (
                request.method == "OPTIONS"
                and origin is not None
                and listed
                and "Access-Control-Request-Method" in request.headers
            ):
                return web.Response(status=204, headers=guard._cors(origin, preflight=True))
            if request.method not in _SAFE_METHODS and not listed:
                own = f"{request.scheme}://{request.host}"
                cross = request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
                if cross or (origin is not None and origin.lower() != own.lower()):
                    return error_response(
                        403,
                        "PERMISSION_DENIED",
                        "cross-site request refused (taskd serve --cors-origin)",
                    )
            response = await handler(request)
            if listed and origin is not None and not response.prepared:
                response.headers.update(guard._cors(origin, preflight=False))
            return response

        return browser_guard

    @staticmethod
    def _cors(origin: str, *, preflight: bool) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
            headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            headers["Access-Control-Max-Age"] = "600"
        else:
            headers["Access-Control-Expose-Headers"] = "Location, Link, Retry-After"
        return headers


# --- auth -------------------------------------------------------------------------------


async def _owner(request: web.Request, state: _State | None = None) -> str | None:
    if state is not None and state.auth is None:
        return None  # no auth: everything belongs to owner None
    cached = request.get(_OWNER, _NO_OWNER)
    if cached is not _NO_OWNER:
        assert cached is None or isinstance(cached, str)
        return cached
    state = _state_of(request)
    owner: str | None = None
    if state.auth is not None:
        result = state.auth(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str):
            log.error("auth callback returned %r, not a str", type(result).__name__)
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
        owner = result
    request[_OWNER] = owner
    return owner


# --- parsing ----------------------------------------------------------------------------


async def _body(request: web.Request, allowed: frozenset[str]) -> dict[str, object]:
    """The JSON object body (``{}`` when empty); unknown fields are refused."""
    try:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    except ConnectionResetError:
        # The client hung up mid-body: nobody is left to answer; end quietly.
        raise _ClientGone() from None
    if not raw.strip():
        return {}
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _invalid("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise _invalid("request body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}", fields=list(unknown))
    return data


def _field(
    data: Mapping[str, object], name: str, kind: type[T], *, required: bool = False
) -> T | None:
    value = data.get(name)
    if value is None:
        if required:
            raise _invalid(f"field {name!r} is required", field=name)
        return None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _invalid(f"field {name!r} must be {_TYPE_NAMES[kind]}", field=name)
    if kind is str:
        try:
            check_unicode(value, f"field {name!r}")  # type: ignore[arg-type]
        except ValueError as exc:
            raise _invalid(str(exc), field=name) from None
    return value  # type: ignore[return-value]


_TYPE_NAMES: Final[dict[type, str]] = {
    str: "a string",
    float: "a number",
    dict: "an object",
}


def _one_query(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _invalid(f"query parameter {name!r} given more than once", parameter=name)
    return values[0] if values else None


def _number_query(request: web.Request, name: str) -> float | None:
    text = _one_query(request, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(f"query parameter {name!r} must be a number", parameter=name) from None
    if not math.isfinite(value):
        raise _invalid(f"query parameter {name!r} must be finite", parameter=name)
    return value


def _filters(request: web.Request) -> tuple[list[str] | None, str | None, str | None]:
    """The listing filters of a request (list and events share them), checked."""
    # An empty value means no filter, as clients send ``task_type=`` for "any".
    task_type = _one_query(request, "task_type") or None
    resource_id = _one_query(request, "resource_id") or None
    if task_type is not None:
        check_task_type(task_type)
    check_resource_id(resource_id)
    return _statuses(request), task_type, resource_id


def _statuses(request: web.Request) -> list[str] | None:
    try:
        parsed = parse_statuses(request.query.getall("status", []))
    except ValueError as exc:
        raise _invalid(str(exc), parameter="status") from None
    return None if parsed is None else sorted(parsed)


# --- rendering --------------------------------------------------------------------------


def _ok(
    payload: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=b'{"status":"ok","result":' + payload + b"}",
        content_type=_JSON,
        headers=headers,
    )


def _record_response(
    state: _State, rec: TaskRecord, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    if not rec.is_terminal:
        headers = dict(headers or ())
        headers["Retry-After"] = RETRY_AFTER
        headers["Cache-Control"] = "no-store"
    return _ok(state.render(rec), status, headers)


# --- page tokens ------------------------------------------------------------------------


def _filter_digest(
    statuses: list[str] | None, task_type: str | None, resource_id: str | None
) -> str:
    key = json.dumps([statuses, task_type, resource_id], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _encode_token(cursor: str, digest: str) -> str:
    raw = json.dumps({"c": cursor, "f": digest}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, digest: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        cursor, token_digest = data["c"], data["f"]
    except (ValueError, KeyError, TypeError, UnicodeEncodeError):
        raise _invalid("page_token is not valid", parameter="page_token") from None
    if not isinstance(cursor, str) or token_digest != digest:
        raise _invalid(
            "page_token does not belong to this listing (different filters)",
            parameter="page_token",
        )
    return cursor


# --- handlers ---------------------------------------------------------------------------


_CREATE_FIELDS: Final = frozenset(
    {"task_type", "resource_id", "metadata", "callback_url", "heartbeat_timeout"}
)


class _Handlers:
    """The API's request handlers, bound to one application's state (no lookups)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    async def get_task(self, request: web.Request) -> web.Response:
        state = self.state
        # The hottest route (every poll): no coroutine for the owner without auth.
        owner = None if state.auth is None else await _owner(request, state)
        task_id = request.match_info["task_id"]
        wait = _number_query(request, "wait") if request.query_string else None
        if wait is None:
            rec = await state.tracker.get(task_id, owner=owner)
            if rec is None:
                raise TaskNotFound(task_id)
        else:
            if not 0 < wait <= state.max_wait:
                raise _invalid(
                    f"wait must be > 0 and <= {state.max_wait:g} seconds", parameter="wait"
                )
            rec = await state.tracker.poll(task_id, wait, owner=owner)
        return _record_response(state, rec)

    async def list_tasks(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        statuses, task_type, resource_id = _filters(request)
        limit_text = _one_query(request, "limit")
        limit = 50
        if limit_text is not None:
            try:
                limit = int(limit_text)
            except ValueError:
                raise _invalid("limit must be an integer", parameter="limit") from None
            if not 1 <= limit <= MAX_LIMIT:
                raise _invalid(f"limit must be between 1 and {MAX_LIMIT}", parameter="limit")
        digest = _filter_digest(statuses, task_type, resource_id)
        token = _one_query(request, "page_token")
        cursor = _decode_token(token, digest) if token else None
        page = await state.tracker.list_page(
            status=statuses,
            task_type=task_type,
            resource_id=resource_id,
            limit=limit,
            owner=owner,
            cursor=cursor,
        )
        next_token = _encode_token(page.next_cursor, digest) if page.next_cursor else None
        items = b",".join(state.render(r) for r in page.records)
        body = (
            b'{"status":"ok","result":['
            + items
            + b'],"next_page_token":'
            + json.dumps(next_token).encode()
            + b"}"
        )
        headers = {}
        if next_token is not None:
            query: list[tuple[str, str]] = [
                (k, v) for k, v in request.query.items() if k != "page_token"
            ]
            query.append(("page_token", next_token))
            headers["Link"] = f'<{request.path}?{urlencode(query)}>; rel="next"'
        return web.Response(body=body, content_type=_JSON, headers=headers)

    async def create_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, _CREATE_FIELDS)
        task_type = _field(data, "task_type", str, required=True)
        assert task_type is not None
        callback_url = _field(data, "callback_url", str)
        rec = await state.tracker.create(
            task_type,
            resource_id=_field(data, "resource_id", str),
            metadata=_field(data, "metadata", dict),
            owner=owner,
            callback_url=callback_url,
            heartbeat_timeout=_field(data, "heartbeat_timeout", float),
        )
        return _record_response(state, rec, 201, {"Location": state.task_url(rec.task_id)})

    async def start_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        await _body(request, frozenset())
        rec = await state.tracker.start(request.match_info["task_id"], owner=owner)
        return _record_response(state, rec)

    async def progress_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, frozenset({"progress", "message"}))
        rec = await state.tracker.progress(
            request.match_info["task_id"],
            _field(data, "progress", float),
            message=_field(data, "message", str),
            owner=owner,
        )
        return _record_response(state, rec)

    async def complete_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, frozenset({"result"}))
        result: JSON = data.get("result")  # type: ignore[assignment]  # parsed JSON
        rec = await state.tracker.complete(request.match_info["task_id"], result, owner=owner)
        return _record_response(state, rec)

    async def fail_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, frozenset({"error"}))
        error = _field(data, "error", str, required=True)
        assert error is not None
        rec = await state.tracker.fail(request.match_info["task_id"], error, owner=owner)
        return _record_response(state, rec)

    async def cancel_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        await _body(request, frozenset())
        rec = await state.tracker.cancel(request.match_info["task_id"], owner=owner)
        return _record_response(state, rec, 202)

    async def delete_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        task_id = request.match_info["task_id"]
        await state.tracker.delete(task_id, owner=owner)
        state.forget(task_id)
        return web.Response(status=204)

    async def task_events(self, request: web.Request) -> web.StreamResponse:
        """SSE: the task's current state, then one event per change; ends after the
        terminal one. A reconnect (``Last-Event-ID``) to an ended task gets 204, which
        tells an ``EventSource`` to stop reconnecting."""
        state = self.state
        owner = await _owner(request, state)
        sub = Subscription(
            task_id=request.match_info["task_id"],
            owner=owner,
            maxsize=SSE_BUFFER,
            resume_from=_last_event_id(request),
        )
        rec = await state.tracker.subscribe(sub)
        assert rec is not None
        try:
            if rec.is_terminal and sub.resumed and not sub.queued:
                return web.Response(status=204)  # nothing missed: stop reconnecting
            return await _stream(state, request, sub, None if sub.resumed else rec)
        finally:
            state.tracker.unsubscribe(sub)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """SSE of every change visible to the caller, with the list's filters."""
        state = self.state
        owner = await _owner(request, state)
        statuses, task_type, resource_id = _filters(request)
        sub = Subscription(
            owner=owner,
            statuses=None if statuses is None else frozenset(TaskStatus(s) for s in statuses),
            task_type=task_type,
            resource_id=resource_id,
            maxsize=SSE_BUFFER,
            resume_from=_last_event_id(request),
        )
        await state.tracker.subscribe(sub)
        try:
            return await _stream(state, request, sub, None)
        finally:
            state.tracker.unsubscribe(sub)

    async def openapi_doc(self, request: web.Request) -> web.Response:
        state = self.state
        doc = _openapi.document(
            prefix=state.api_base(), auth=state.auth is not None, max_wait=state.max_wait
        )
        return web.json_response(doc)


_DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _dashboard_handler(state: _State) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The single-page dashboard: one file shipped in the package, no build step, no
    network fetches but to this API (the CSP says so)."""
    template = resources.files("taskd").joinpath("static/dashboard.html").read_text("utf-8")
    pages: dict[str, bytes] = {}

    async def dashboard(request: web.Request) -> web.Response:
        # The API's mount point is known once the app runs (a sub-app's prefix).
        base = state.api_base()
        page = pages.get(base)
        if page is None:
            page = pages[base] = template.replace("__TASKD_PREFIX__", base).encode()
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _DASHBOARD_CSP, "Cache-Control": "no-cache"},
        )

    return dashboard


async def _health(request: web.Request) -> web.Response:
    reason = _state_of(request).tracker.health()
    if reason is not None:
        return error_response(503, "UNAVAILABLE", reason, None, {"Retry-After": RETRY_AFTER})
    return web.json_response({"status": "ok"})


# --- event streams ----------------------------------------------------------------------


def _last_event_id(request: web.Request) -> int | None:
    # Event ids are the actor's change sequence (see docs/http-api.md); anything else
    # is no resumption point, and the client gets the current state.
    text = request.headers.get("Last-Event-ID", "").strip()
    return int(text) if text.isdigit() and len(text) < 19 else None


async def _stream(
    state: _State, request: web.Request, sub: Subscription, first: TaskRecord | None
) -> web.StreamResponse:
    """Write a subscription as Server-Sent Events (aiohttp-sse) until it ends.

    The subscription buffers and coalesces on its own, so a slow client only slows
    its own stream; a client that stops reading is cut off after ``SSE_SEND_TIMEOUT``.
    """
    response = EventSourceResponse(
        send_timeout=SSE_SEND_TIMEOUT, ping_interval=state.sse_ping_interval
    )
    # aiohttp-sse sets ``no-cache`` in its constructor; an event stream must not be
    # stored by any cache either, so ours replaces it.
    response.headers["Cache-Control"] = "no-store"
    state.streams.add(sub)
    try:
        await response.prepare(request)
        if first is not None:
            await response.send(state.render(first).decode(), id=str(sub.since))
        while (item := await sub.next()) is not None:
            seq, rec = item
            await response.send(state.render(rec).decode(), id=str(seq))
        response.stop_streaming()
        await response.wait()
    except (ConnectionError, TimeoutError) as exc:
        # The client went away or stopped reading: its stream simply ends. Not an
        # error of ours, and a flood of these must not flood the log.
        log.debug("event stream to %s ended: %r", request.remote, exc)
    finally:
        state.streams.discard(sub)
    return response


# --- wiring -----------------------------------------------------------------------------


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a str")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise ValueError("prefix must start with '/' and not end with '/' (or be empty)")
    return prefix


def setup(
    app: web.Application,
    *,
    retention: Retention | None = None,
    store: Store | None = None,
    close_timeout: float = 5.0,
    cancel_grace: float = 60.0,
    prefix: str = "/api/v1",
    auth: AuthCallback | None = None,
    max_wait: float = MAX_WAIT,
    webhooks: Webhooks | None = None,
    sse_ping_interval: float = 15.0,
    dashboard: bool | str = False,
    _metrics: bool = False,
) -> Tracker:
    """Install a tracker on ``app`` and register the task routes under ``prefix``.

    The tracker is opened and closed by a ``cleanup_ctx``: on cleanup it stops taking
    commands, gives running spawned tasks ``close_timeout`` seconds, then cancels them
    and records them cancelled. ``auth(request)`` returns the caller's owner or raises
    ``web.HTTPUnauthorized``; each caller sees only its own tasks. ``max_wait`` caps
    the long-poll ``?wait=`` (60 seconds, the most allowed). ``webhooks`` turns on
    signed callbacks; ``sse_ping_interval`` paces event-stream keep-alives;
    ``dashboard=True`` serves the dashboard page at ``/dashboard`` (or at the path
    given as a string).
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"setup() needs an aiohttp web.Application, not {type(app).__name__}")
    if _STATE in app:
        raise RuntimeError("taskd.web.setup() was already called on this application")
    if auth is not None and not callable(auth):
        raise TypeError("auth must be callable")
    wait_cap = check_seconds(max_wait, "max_wait")
    ping = check_seconds(sse_ping_interval, "sse_ping_interval")
    if wait_cap is None or ping is None:
        raise TypeError("max_wait and sse_ping_interval must be numbers of seconds")
    if wait_cap > MAX_WAIT:
        raise ValueError(f"max_wait must be <= {MAX_WAIT:g}")
    tracker = Tracker(
        retention=retention,
        store=store,
        close_timeout=close_timeout,
        cancel_grace=cancel_grace,
        webhooks=webhooks,
    )
    state = _State(
        tracker,
        _check_prefix(prefix),
        auth,
        wait_cap,
        ping,
        {} if _metrics else None,
    )
    state.app = app
    app[_STATE] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with tracker:
            yield

    async def end_streams(app: web.Application) -> None:
        # Runs before the server waits for open requests: event streams and long-polls
        # would otherwise hold shutdown until their clients hang up or time out.
        for sub in list(state.streams):
            sub.end()
        await tracker.release_polls()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    app.middlewares.append(_make_middleware(state))
    r = app.router
    p = state.prefix
    h = _Handlers(state)
    routes = [
        r.add_get(p + "/tasks", h.list_tasks, allow_head=False, name=_ROUTE_LIST),
        r.add_post(p + "/tasks", h.create_task),
        r.add_get(p + "/tasks/{task_id}", h.get_task, allow_head=False),
        r.add_delete(p + "/tasks/{task_id}", h.delete_task),
        r.add_post(p + "/tasks/{task_id}/start", h.start_task),
        r.add_post(p + "/tasks/{task_id}/progress", h.progress_task),
        r.add_post(p + "/tasks/{task_id}/complete", h.complete_task),
        r.add_post(p + "/tasks/{task_id}/fail", h.fail_task),
        r.add_post(p + "/tasks/{task_id}/cancel", h.cancel_task),
        r.add_get(p + "/tasks/{task_id}/events", h.task_events, allow_head=False),
        r.add_get(p + "/events", h.events, allow_head=False),
        r.add_get(p + "/openapi.json", h.openapi_doc, allow_head=False),
    ]
    state.resources.update(route.resource for route in routes if route.resource is not None)
    if dashboard:
        path = dashboard if isinstance(dashboard, str) else "/dashboard"
        r.add_get(path, _dashboard_handler(state), allow_head=False)
    return tracker


def create_app(
    *,
    retention: Retention | None = None,
    store: Store | None = None,
    close_timeout: float = 5.0,
    cancel_grace: float = 60.0,
    prefix: str = "/api/v1",
    auth: AuthCallback | None = None,
    max_wait: float = MAX_WAIT,
    client_max_size: int = MAX_BODY,
    demo: bool = False,
    webhooks: Webhooks | None = None,
    sse_ping_interval: float = 15.0,
    guard: BrowserGuard | None = None,
) -> web.Application:
    """The standalone application: the task API under ``prefix``, ``/health``,
    ``/metrics`` and the dashboard at ``/``; with ``demo``, a stream of simulated
    jobs. ``guard`` (default: a ``BrowserGuard`` that checks ``Host`` when there is no
    ``auth``) refuses cross-site writes and, without tokens, foreign ``Host`` values."""
    if guard is None:
        guard = BrowserGuard(check_host=auth is None)
    elif not isinstance(guard, BrowserGuard):
        raise TypeError("guard must be a taskd.web.BrowserGuard")
    app = web.Application(client_max_size=client_max_size, middlewares=[guard.middleware()])
    tracker = setup(
        app,
        retention=retention,
        store=store,
        close_timeout=close_timeout,
        cancel_grace=cancel_grace,
        prefix=prefix,
        auth=auth,
        max_wait=max_wait,
        webhooks=webhooks,
        sse_ping_interval=sse_ping_interval,
        dashboard="/",
        _metrics=True,
    )
    app.router.add_get("/health", _health, allow_head=False)
    app.router.add_get("/metrics", _metrics_handler, allow_head=False)
    if demo:

        async def demo_jobs(app: web.Application) -> AsyncIterator[None]:
            from ._demo import run_demo

            job = asyncio.get_running_loop().create_task(run_demo(tracker), name="taskd-demo")
            yield
            job.cancel()  # cleanup runs this before the tracker's: stop feeding it first
            with contextlib.suppress(asyncio.CancelledError):
                await job

        app.cleanup_ctx.append(demo_jobs)
    return app


def bearer_auth(tokens: Mapping[str, str | None]) -> AuthCallback:
    """An ``auth`` callback for ``Authorization: Bearer <token>``; ``tokens`` maps each
    token to its owner. Tokens are compared in constant time, all of them every time."""
    if not tokens:
        raise ValueError("bearer_auth needs at least one token")
    table = [(token.encode(), owner or "default") for token, owner in tokens.items()]

    def auth(request: web.Request) -> str:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        presented = given.strip().encode()
        owner: str | None = None
        for token, who in table:
            if hmac.compare_digest(token, presented) and scheme.lower() == "bearer":
                owner = who
        if owner is None:
            raise web.HTTPUnauthorized(
                headers={"WWW-Authenticate": 'Bearer realm="taskd"'}, reason="Unauthorized"
            )
        return owner

    return auth


async def _metrics_handler(request: web.Request) -> web.Response:
    state = _state_of(request)
    if state.auth is not None:
        # With tokens, metrics (which name every owner's task types) need one too.
        try:
            await _owner(request, state)
        except web.HTTPUnauthorized as exc:
            return error_response(
                401, "UNAUTHENTICATED", exc.reason, None, {"WWW-Authenticate": "Bearer"}
            )
    stats = await state.tracker.stats()
    body = _metrics.render(stats, state.http_counts or {})
    return web.Response(body=body, headers={"Content-Type": _metrics.CONTENT_TYPE})


# --- helpers for the application's own handlers -----------------------------------------


async def spawn(
    request: web.Request,
    coro: Coroutine[Any, Any, T],
    *,
    task_type: str,
    resource_id: str | None = None,
    metadata: Mapping[str, JSON] | None = None,
    timeout: float | None = None,
    callback_url: str | None = None,
) -> TaskHandle[T]:
    """``Tracker.spawn`` for a request handler: the task belongs to the request's owner.

    ``TaskConflict`` and other taskd errors raised here are answered with the error
    envelope by the middleware ``setup`` installed.
    """
    try:
        state = _state_of(request)
        owner = await _owner(request, state)
    except BaseException:
        coro.close()
        raise
    return await state.tracker.spawn(
        coro,
        task_type=task_type,
        resource_id=resource_id,
        metadata=metadata,
        owner=owner,
        timeout=timeout,
        callback_url=callback_url,
    )


def accepted(
    request: web.Request,
    task: TaskHandle[Any] | TaskRecord,
    result: Mapping[str, JSON] | None = None,
) -> web.Response:
    """``202 Accepted`` with ``Location`` (the task's URL) and the success envelope.

    The envelope's ``result`` is ``result`` plus ``task_id`` when given, else the
    task's record.
    """
    state = _state_of(request)
    rec = task.record if isinstance(task, TaskHandle) else task
    headers = {"Location": state.task_url(rec.task_id)}
    if result is None:
        return _ok(state.render(rec), 202, headers)
    payload = dict(result)
    payload["task_id"] = rec.task_id
    return _ok(json.dumps(payload, separators=(",", ":")).encode(), 202, headers)
