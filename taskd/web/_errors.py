"""Errors as envelopes: ``RequestError``, ``error_response`` and the middleware that
answers taskd's routes with the error table (docs/http-api.md), never a traceback."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

from .._counters import HTTP_BUCKETS, Histogram
from .._errors import BY_CODE, CODE_FOR_STATUS, TaskdError
from .._models import (
    JSON,
)
from ._state import _JSON, RETRY_AFTER, _State

if TYPE_CHECKING:
    from ._guard import Screen

log = logging.getLogger("taskd.web")
T = TypeVar("T")

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
    headers = {"Retry-After": RETRY_AFTER} if BY_CODE[exc.code].retry_after else None
    return RequestError(exc.http_status, exc.code, str(exc), exc.error_details(), headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def enveloped(handler: Handler) -> Handler:
    """Wrap one of taskd's own route handlers: every error it raises is answered with
    the envelope (the error table), never a 500 page or a traceback. taskd's routes
    are wrapped one by one, so a host application's routes are never judged."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return _error_to_response(request, exc)

    return wrapped


def method_not_allowed(allowed: Iterable[str]) -> Handler:
    """The handler of a taskd path for the methods it does not declare: 405 with
    ``Allow``, in the envelope (registered last on the path, as a ``*`` route)."""
    allow = ", ".join(sorted(allowed))

    async def handler(request: web.Request) -> web.StreamResponse:
        return error_response(
            405,
            "METHOD_NOT_ALLOWED",
            f"method {request.method} is not allowed here; allowed: {allow}",
            None,
            {"Allow": allow},
        )

    return handler


def make_middleware(
    state: _State, *, standalone: bool, screen: Screen | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware ``setup`` installs. On a host application it touches only
    taskd's own exceptions (``TaskConflict`` from ``taskd.web.spawn`` in the host's
    handler, say), answered with the envelope; everything else of the host's passes
    untouched — taskd's routes are enveloped by their own wrappers. On the standalone
    application, whose routes are all taskd's, it also envelopes what the router
    answers (unknown paths) and counts requests per route for ``/metrics``; with a
    ``screen`` (the browser guard's checks) it applies that first, as the outermost
    middleware would (its refusals are neither enveloped again nor counted)."""
    counts = state.http_counts
    durations = state.http_durations
    timed = counts is not None and durations is not None  # the standalone app's metrics
    clock = time.perf_counter

    @web.middleware
    async def taskd_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if screen is not None:
            refused = screen.before(request)
            if refused is not None:
                return refused
        began = clock() if timed else 0.0
        try:
            response = await handler(request)
        except TaskdError as exc:
            response = _error_to_response(request, exc)
        except Exception as exc:
            if not standalone:
                raise
            response = _error_to_response(request, exc)
        if timed:
            assert counts is not None and durations is not None
            route = request.match_info.route.resource
            method = request.method
            name = route.canonical if route is not None else "(unmatched)"
            key = (method, name, response.status)
            counts[key] = counts.get(key, 0) + 1
            hist = durations.get((method, name))
            if hist is None:
                hist = durations[(method, name)] = Histogram(HTTP_BUCKETS)
            hist.observe(clock() - began)
        if screen is not None:
            screen.after(request, response)
        return response

    return taskd_middleware


class _ClientGone(Exception):
    """The client disconnected before its body was read: answered 400 (which it will
    most likely never read), so that the handler stops there."""


def _error_to_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Answer an error of taskd's routes with the envelope."""
    if isinstance(exc, RequestError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    if isinstance(exc, _ClientGone):
        return error_response(400, "INVALID_ARGUMENT", "request body incomplete")
    if isinstance(exc, TaskdError):
        err = _from_taskd_error(exc)
        return error_response(err.status, err.code, err.message, err.details, err.headers)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # a redirect or a success raised as an exception: aiohttp's
        code = CODE_FOR_STATUS.get(
            exc.status, "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL"
        )
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return error_response(exc.status, code, exc.reason, None, headers)
    if isinstance(exc, ValueError | TypeError):
        # The tracker's argument checks: the request carried a bad value.
        return error_response(400, "INVALID_ARGUMENT", str(exc))
    # A bug of ours: log it, but never leak a traceback to the client.
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "INTERNAL", "internal error")
