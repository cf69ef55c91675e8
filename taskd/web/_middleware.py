"""The middleware ``setup`` installs, the wrapper of each of taskd's routes on a host
application (how an error raised on taskd's routes reaches the envelope:
``_errors``), and the standalone app's route wrapper, where it applies its guard and
counts and times its requests for ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from .._counters import HTTP_BUCKETS, Histogram
from .._errors import TaskdError
from ._context import _State
from ._errors import Handler, error_to_response
from ._guard import Screen

__all__ = ["enveloped", "make_middleware", "route_wrapper"]

# Methods a guard never refuses for their own sake (no Origin: no CORS either).
_QUIET: Final = frozenset({"GET", "HEAD"})


def enveloped(handler: Handler) -> Handler:
    """Wrap one of taskd's own route handlers: every error it raises is answered with
    the envelope (the error table), never a 500 page or a traceback. taskd's routes
    are wrapped one by one, so a host application's routes are never judged."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return error_to_response(request, exc)

    return wrapped


def route_wrapper(state: _State, screen: Screen | None) -> Callable[[Handler, str], Handler]:
    """The standalone application's wrapper of each route (no middleware: aiohttp
    runs none then, which spares the hottest route two frames and a chain per
    request): the guard's checks first, then the handler, every error answered with
    the envelope, and the request counted and timed for ``/metrics`` under ``name``
    (the route's path, ``(unmatched)`` for the catch-all)."""
    http = state.http
    counts = {} if http is None else http.counts
    durations = {} if http is None else http.durations
    clock = time.perf_counter

    check_host = screen is not None and screen.check_host
    hosts = {} if screen is None else screen.hosts

    def wrap(handler: Handler, name: str) -> Handler:
        now = state.now.get(handler)
        # method -> status -> (the count's key, the duration histogram): no tuple
        # made per request.
        cells: dict[str, dict[int, tuple[tuple[str, str, int], Histogram]]] = {}

        def cell(method: str, status: int) -> tuple[tuple[str, str, int], Histogram]:
            key = (method, name, status)
            counts.setdefault(key, 0)
            hist = durations.get((method, name))
            if hist is None:
                hist = durations[(method, name)] = Histogram(HTTP_BUCKETS)
            made = cells.setdefault(method, {})[status] = (key, hist)
            return made

        async def route(request: web.Request) -> web.StreamResponse:
            screened = False
            if screen is not None:
                headers = request.headers
                # The common request (GET or HEAD, no Origin, a Host already found
                # allowed) passes the guard and gets no CORS headers: skip both calls.
                if (
                    "Origin" in headers
                    or request.method not in _QUIET
                    or (check_host and hosts.get(headers.get("Host", "")) is not True)
                ):
                    screened = True
                    refused = screen.before(request)
                    if refused is not None:
                        return refused
            began = clock()
            try:
                # A poll whose record is at hand is answered here: no coroutine made
                # and awaited for it (the hottest route's largest cost of its own).
                answer = None if now is None else now(request)
                response = await handler(request) if answer is None else answer
            except Exception as exc:
                response = error_to_response(request, exc)
            method, status = request.method, response.status
            by_status = cells.get(method)
            found = None if by_status is None else by_status.get(status)
            key, hist = cell(method, status) if found is None else found
            counts[key] += 1
            hist.observe(clock() - began)
            if screened:
                screen.after(request, response)  # type: ignore[union-attr]
            return response

        return route

    return wrap


def make_middleware() -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware ``setup`` installs on a host's application: it touches only
    taskd's own exceptions (``TaskConflict`` from ``taskd.web.spawn`` in the host's
    handler, say), answered with the envelope; everything else of the host's passes
    untouched (taskd's routes are enveloped by their own wrappers). The standalone
    application has no middleware (``route_wrapper``)."""

    @web.middleware
    async def taskd_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TaskdError as exc:
            return error_to_response(request, exc)

    return taskd_middleware
