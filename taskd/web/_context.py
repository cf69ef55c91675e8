"""Per-application context: what ``setup`` keeps on an aiohttp application (under a
``web.AppKey``, found from sub-applications through ``request.config_dict``) — the
tracker, the options, the render cache, the open streams — and who is asking (the
caller's owner, from the ``auth`` callback, once per request)."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from aiohttp import web

from .._counters import HttpCounters
from .._models import (
    TaskRecord,
)
from ..actor.subscription import Subscription
from ..tracker import Tracker

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
#: Every 200 answer's envelope around its result (docs/http-api.md): a JSON answer
#: ends with a newline.
OK_HEAD: Final = b'{"status":"ok","result":'
OK_TAIL: Final = b"}\n"
_OK_HEAD_LEN: Final = len(OK_HEAD)
_OK_TAIL_LEN: Final = len(OK_TAIL)


#: A route handler (as ``_errors.Handler``).
_Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _State:
    tracker: Tracker
    prefix: str
    auth: AuthCallback | None
    max_wait: float
    sse_ping_interval: float
    #: Requests served and their durations, by route (the tracker's: its process's
    #: series); None unless this application exports metrics (``create_app``).
    http: HttpCounters | None = None
    #: The request body limit, for the OpenAPI document (aiohttp's default: 1 MiB).
    max_body: int = MAX_BODY
    #: How the standalone application wraps each route (``route_wrapper``); None on
    #: a host's application (its middleware, and ``enveloped`` routes).
    wrap: Callable[[_Route, str], _Route] | None = None
    #: A route's answer without a coroutine when it is at hand (the task GET's read
    #: fast path), by the route's handler; None from it: the handler answers.
    now: dict[_Route, Callable[[web.Request], web.StreamResponse | None]] = field(
        default_factory=dict
    )
    #: The application setup() was called on (maybe mounted as a sub-application).
    app: web.Application | None = None
    _base: str | None = None
    #: Open event streams, ended on shutdown so that the server need not wait for them.
    streams: set[Subscription] = field(default_factory=set)
    # task_id -> (record, its 200 answer's body), oldest first.
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
        """The record's JSON (a list's item, an event's data): ``render_ok``'s body
        without the envelope."""
        return self.render_ok(rec)[_OK_HEAD_LEN:-_OK_TAIL_LEN]

    def render_ok(self, rec: TaskRecord) -> bytes:
        """The body of a 200 answer with this record (``OK_HEAD``, the record's JSON,
        ``OK_TAIL``), rendered once per record version (records are immutable): the
        hottest route sends the cached bytes as they are. The cache is keyed by task
        id, so a task holds one entry, and bounded in bytes, oldest first; a deleted
        task's entry is dropped."""
        cache = self.rendered
        hit = cache.get(rec.task_id)
        if hit is not None and hit[0] is rec:
            return hit[1]
        body = OK_HEAD + rec.to_json().encode() + OK_TAIL
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
