"""Errors as envelopes: ``RequestError``, ``error_response`` and the middleware that
answers taskd's routes with the error table (docs/http-api.md), never a traceback."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from aiohttp import web

from .._errors import CODE_FOR_STATUS, TaskdError
from .._models import (
    JSON,
)
from ._state import _JSON, _STATE, RETRY_AFTER, _State

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
    """The client disconnected before its body was read: answered 400 (which it will
    most likely never read), so that the handler stops there."""


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
