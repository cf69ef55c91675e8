"""Errors as envelopes: ``RequestError``, ``error_response``, ``error_to_response``
(any exception of taskd's routes answered with the error table, docs/http-api.md,
never a traceback; ``_middleware`` applies it), and ``EnvelopeHandler``, which does
the same for what aiohttp answers before any middleware runs (malformed requests) on
``taskd serve``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .._errors import BY_CODE, CODE_FOR_STATUS, TaskdError
from .._models import (
    JSON,
)
from ._context import _JSON, RETRY_AFTER

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
        # Every JSON answer ends with a newline, as a text file (and `curl`) expects.
        body=json.dumps(body, separators=(",", ":")).encode() + b"\n",
        content_type=_JSON,
        headers=headers,
    )


def _from_taskd_error(exc: TaskdError) -> RequestError:
    headers = {"Retry-After": RETRY_AFTER} if BY_CODE[exc.code].retry_after else None
    return RequestError(exc.http_status, exc.code, str(exc), exc.error_details(), headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


class _ClientGone(Exception):
    """The client disconnected before its body was read: answered 400 (which it will
    most likely never read), so that the handler stops there."""


def error_to_response(request: web.Request, exc: Exception) -> web.StreamResponse:
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


# --- what aiohttp answers before any middleware runs ------------------------------------

#: A request line as llhttp quotes it in its error (``b'FOO /path HTTP/1.1'``).
_REQUEST_LINE: Final = re.compile(r"b'([!#$%&*+.^_`|~0-9A-Za-z-]+) (/[^\s']*) HTTP/1\.[01]'")


class EnvelopeHandler(RequestHandler):
    """aiohttp's connection handler, answering in the error envelope what aiohttp
    answers before the application sees a request: a request its parser refuses
    (two ``Content-Length`` headers, ``Content-Length`` with ``Transfer-Encoding``, a
    request line or header over 8190 bytes, garbage) is 400 ``INVALID_ARGUMENT``, a
    method the parser does not know (``FOO``) is 405 with ``Allow`` on a path of the
    application's (404 elsewhere), and an exception that escaped every middleware is
    500 ``INTERNAL``. ``taskd serve`` runs its connections with it
    (docs/http-api.md); an application embedded in another server keeps aiohttp's
    plain-text answers. aiohttp's public hook, ``handle_error``, is the one changed.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The envelope for an error aiohttp answers itself; the connection closes."""
        if request.writer.output_size > 0 or status < 400:
            # Part of a response went out: aiohttp's own path (it gives up the
            # connection); nothing else reaches here with a status below 400.
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            # A client's malformed request: not an error of ours, and a probe sends
            # thousands; aiohttp would log a traceback for each.
            log.debug("malformed request from %s: %r", request.remote, exc)
            response = self._parse_error(exc)
        else:
            if status >= 500 and exc is not None:
                self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            code = CODE_FOR_STATUS.get(status, "INTERNAL")
            text = "internal error" if status == 500 else f"HTTP {status}"
            response = error_response(status, code, text)
        response.force_close()
        return response

    def _parse_error(self, exc: HttpProcessingError) -> web.Response:
        if isinstance(exc, BadHttpMethod):
            line = _REQUEST_LINE.search(exc.message)
            if line is not None:
                return self._unknown_method(line.group(1), line.group(2))
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else "8190"
            text = f"the request line or a header is longer than {limit} bytes"
        else:
            # llhttp's reason is its first line ("Duplicate Content-Length:"); the
            # lines after it quote the request.
            text = (exc.message or "Bad Request").splitlines()[0].rstrip(": ")[:200]
        return error_response(400, "INVALID_ARGUMENT", f"malformed HTTP request: {text}")

    def _unknown_method(self, method: str, target: str) -> web.Response:
        # The server's handler is the application's bound ``_handle``.
        server = self._manager
        app = getattr(server.request_handler, "__self__", None) if server else None
        allowed = _allowed_methods(app, target.partition("?")[0])
        if allowed is None:
            return error_response(404, "NOT_FOUND", f"no route for {target[:200]}")
        allow = ", ".join(allowed)
        return error_response(
            405,
            "METHOD_NOT_ALLOWED",
            f"method {method[:40]} is not allowed here; allowed: {allow}",
            None,
            {"Allow": allow},
        )


def _allowed_methods(app: object, path: str) -> list[str] | None:
    """The methods the application declares for ``path`` (its routes' own, not the
    catch-all), or None when no resource of it matches the path."""
    if not isinstance(app, web.Application):
        return None
    for resource in app.router.resources():
        info = resource.get_info()
        fixed = info.get("path")
        pattern = info.get("pattern")
        if fixed == path or (isinstance(pattern, re.Pattern) and pattern.fullmatch(path)):
            methods = sorted({route.method for route in resource if route.method != "*"})
            if methods:  # (not the catch-all of unmatched paths, which declares none)
                return methods
    return None
