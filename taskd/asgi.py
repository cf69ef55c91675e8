"""``taskd.asgi``: the task API as an ASGI application, for FastAPI and Starlette apps.

    app.mount("/", taskd.asgi.app(tracker))

The same routes, envelopes, error codes, auth, long-poll, event streams, OpenAPI
document and dashboard as ``taskd.web`` (docs/asgi.md), from the same handlers: this
module is only the adapter. Each ASGI request is presented to ``taskd.web``'s
handlers with the part of aiohttp's ``web.Request`` they read (method, path, match,
query, headers, body, the per-request owner), and their answer (an aiohttp
``web.Response``: status, headers, body) is written back as ASGI messages; event
streams are written here, as Server-Sent Events on the ASGI connection. The routing,
the 404 and 405 envelopes, the browser guard and the request counts of ``/metrics``
mirror ``taskd.web.create_app``'s middleware.

Lifespan: served alone (``uvicorn module:app``), the application opens the tracker at
startup and drains it at shutdown. Mounted in another application, whose lifespan a
mounted app does not receive, enter ``app.lifespan`` in the host's (FastAPI:
``FastAPI(lifespan=taskd_app.lifespan)``); an application whose tracker is not open at
its first request opens it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Unpack, cast
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from ._counters import HTTP_BUCKETS, Histogram
from ._models import TaskRecord
from .actor.subscription import Subscription
from .handle import TrackerState
from .tracker import Tracker
from .web._app import ServeOptions, _check_keys, make_state
from .web._context import _STATE, MAX_BODY, SSE_SEND_TIMEOUT, _State
from .web._errors import error_response, error_to_response, method_not_allowed
from .web._guard import BrowserGuard
from .web._handlers import (
    _dashboard_handler,
    _Handlers,
    health_handler,
    metrics_handler,
    routes,
)

__all__ = ["App", "app"]

log = logging.getLogger("taskd.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Written(web.Response):
    """What the adapter answered itself (an event stream, written as it went)."""


def app(tracker: Tracker | None = None, **options: Unpack[ServeOptions]) -> App:
    """The task API as an ASGI application: ``tracker`` (one made from ``options``
    when None), with ``taskd.web.create_app``'s options (``prefix``, ``auth``,
    ``max_wait``, ``sse_ping_interval``, ``guard``, ``client_max_size``, and the
    tracker's own when none is given). Serves the API under ``prefix``,
    ``/health``, ``/metrics`` and the dashboard at ``/``."""
    _check_keys(options, ServeOptions, "app")
    for unsupported in ("demo", "demo_seed"):
        if options.get(unsupported):
            raise TypeError(f"taskd.asgi.app() has no {unsupported!r} (taskd serve has)")
    guard = options.get("guard")
    if guard is None:
        guard = BrowserGuard(check_host=options.get("auth") is None)
    elif not isinstance(guard, BrowserGuard):
        raise TypeError("guard must be a taskd.web.BrowserGuard")
    state = make_state(options, metrics=True, tracker=tracker)
    state.max_body = options.get("client_max_size", MAX_BODY)
    return App(state, guard, owns=tracker is None)


class _Route:
    __slots__ = ("canonical", "methods", "pattern")

    def __init__(self, path: str, methods: dict[str, Handler]) -> None:
        self.canonical = path
        self.methods = methods
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
        self.pattern = re.compile(regex + "$")


class App:
    """The ASGI application ``app`` returns (see the module docstring)."""

    def __init__(self, state: _State, guard: BrowserGuard, *, owns: bool) -> None:
        self.state = state
        #: The tracker it serves.
        self.tracker = state.tracker
        self._owns = owns
        self._screen = guard.screen()
        self._opening: asyncio.Lock | None = None
        # ``taskd.web.get_tracker`` takes this: the state under the key setup uses.
        self.config_dict: dict[object, object] = {_STATE: state}
        table = routes(_Handlers(state), state.prefix)
        self._routes = [_Route(path, methods) for path, methods in table]
        self._routes.append(_Route("/health", {"GET": health_handler}))
        self._routes.append(_Route("/metrics", {"GET": metrics_handler}))
        self._routes.append(_Route("/", {"GET": _dashboard_handler(state)}))
        self._base_set = False

    def __getitem__(self, key: object) -> object:
        """The state under ``taskd.web``'s key (``get_tracker(app)`` finds it)."""
        return self.config_dict[key]

    @contextlib.asynccontextmanager
    async def lifespan(self, host: object = None) -> AsyncIterator[None]:
        """Open the tracker (if it is not open yet) and, at the end, end the event
        streams, release the long-polls and close it (if this application opened it
        or made it). For a host's lifespan: ``FastAPI(lifespan=app.lifespan)``."""
        opened = await self._open()
        try:
            yield
        finally:
            for sub in list(self.state.streams):
                sub.end()
            if self.tracker.state is TrackerState.OPEN:
                await self.tracker.release_polls()
            if opened or self._owns:
                await self.tracker.aclose()

    async def _open(self) -> bool:
        if self.tracker.state is not TrackerState.NEW:
            return False
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.tracker.state is TrackerState.NEW:
                await self.tracker.__aenter__()
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point: HTTP requests and the lifespan protocol."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # (websockets: none served; the server answers them itself)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        life = self.lifespan()
        try:
            await life.__aenter__()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        try:
            await life.__aexit__(None, None, None)
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if self.tracker.state is TrackerState.NEW:
            await self._open()  # mounted without the host's lifespan
        root = scope.get("root_path", "")
        if not self._base_set:
            state._base = root + state.prefix
            self._base_set = True
        path: str = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        request = Request(self, scope, receive, send, path)
        began = time.perf_counter()
        name = "(unmatched)"
        response = self._screen.before(cast(web.Request, request))
        if response is None:
            route, match = self._match(path)
            try:
                if route is None:
                    response = error_response(404, "NOT_FOUND", "Not Found")
                else:
                    name = route.canonical
                    request.match_info = match
                    handler = route.methods.get(request.method)
                    if handler is None:
                        handler = method_not_allowed(route.methods)
                    response = await handler(cast(web.Request, request))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                response = error_to_response(cast(web.Request, request), exc)
            self._count(request.method, name, response.status, began)
            self._screen.after(cast(web.Request, request), response)
        if not isinstance(response, _Written):
            await _write(send, response)

    def _match(self, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            m = route.pattern.match(path)
            if m is not None:
                return route, m.groupdict()
        return None, {}

    def _count(self, method: str, name: str, status: int, began: float) -> None:
        http = self.state.http
        if http is None:
            return
        key = (method, name, status)
        http.counts[key] = http.counts.get(key, 0) + 1
        hist = http.durations.get((method, name))
        if hist is None:
            hist = http.durations[(method, name)] = Histogram(HTTP_BUCKETS)
        hist.observe(time.perf_counter() - began)


async def _write(send: Send, response: web.StreamResponse) -> None:
    body = getattr(response, "body", None)
    data = body if isinstance(body, bytes) else b""
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
    ]
    if not any(k == b"content-length" for k, _ in headers) and response.status not in (204, 304):
        headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Request:
    """One ASGI request, as ``taskd.web``'s handlers read a request: the part of
    aiohttp's ``web.Request`` they use (see the module docstring)."""

    def __init__(self, owner: App, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        self._app = owner
        self._scope = scope
        self._receive = receive
        self._send = send
        self._items: dict[object, object] = {}
        self._body: bytes | None = None
        self.method: str = scope["method"]
        self.path = path
        raw = scope.get("query_string", b"").decode("latin-1")
        self.query_string = raw
        self.query = MultiDictProxy(MultiDict(parse_qsl(raw, keep_blank_values=True)))
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in scope.get("headers", ()):
            headers.add(k.decode("latin-1"), v.decode("latin-1"))
        self.headers = CIMultiDictProxy(headers)
        self.match_info: dict[str, str] = {}
        self.config_dict = owner.config_dict
        client = scope.get("client")
        self.remote = client[0] if client else None
        self.scheme: str = scope.get("scheme", "http")
        self.host = self.headers.get("Host", "")

    def get(self, key: object, default: object = None) -> object:
        """A value kept for this request (the caller's owner, once known)."""
        return self._items.get(key, default)

    def __setitem__(self, key: object, value: object) -> None:
        self._items[key] = value

    def __getitem__(self, key: object) -> object:
        """A value kept for this request, else the application's (its state: what
        ``taskd.web``'s lookups read from a request that is not aiohttp's)."""
        if key in self._items:
            return self._items[key]
        return self.config_dict[key]

    async def read(self) -> bytes:
        """The body; over ``client_max_size``: 413, as aiohttp answers it."""
        if self._body is not None:
            return self._body
        limit = self._app.state.max_body
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("the client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = b"".join(chunks)
        return self._body

    async def sse(
        self, state: _State, request: object, sub: Subscription, first: TaskRecord | None
    ) -> web.StreamResponse:
        """Write the subscription as Server-Sent Events until it ends or the client
        goes (what aiohttp-sse does for ``taskd.web``): the same headers, events, ids
        and keep-alive comments."""
        send = self._send
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-store"),
            (b"connection", b"keep-alive"),
            (b"x-accel-buffering", b"no"),
        ]
        gone = asyncio.get_running_loop().create_future()

        async def watch() -> None:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    if not gone.done():
                        gone.set_result(None)
                    return

        watcher = asyncio.get_running_loop().create_task(watch(), name="taskd-sse-watch")
        state.streams.add(sub)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})

            async def event(rec: TaskRecord, event_id: int) -> None:
                data = state.render(rec).decode()
                text = f"id: {event_id}\r\ndata: {data}\r\n\r\n"
                async with asyncio.timeout(SSE_SEND_TIMEOUT):
                    await send(
                        {"type": "http.response.body", "body": text.encode(), "more_body": True}
                    )

            if first is not None:
                await event(first, sub.since)
            while True:
                nxt = asyncio.ensure_future(sub.next())
                done, _ = await asyncio.wait(
                    {nxt, gone},
                    timeout=state.sse_ping_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if gone in done:
                    nxt.cancel()
                    break
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await nxt
                    await send(
                        {"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True}
                    )
                    continue
                item = nxt.result()
                if item is None:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                await event(item[1], item[0])
        except (OSError, TimeoutError) as exc:
            log.debug("event stream to %s ended: %r", self.remote, exc)
        finally:
            state.streams.discard(sub)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return _Written(status=200)
