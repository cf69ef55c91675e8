"""aiohttp integration: ``setup(app)``, the task routes of the HTTP API, ``create_app``.

The handlers only translate: parse and check the request, send one message through
the tracker, render the reply. One middleware maps taskd's errors and aiohttp's HTTP
errors on taskd's own routes to the error envelope, so no request gets a 500 or a
traceback.

State lives under a ``web.AppKey`` and is read through ``request.config_dict``, so
``get_tracker`` works from sub-applications too (aiojobs' pattern).

Layout: ``_context`` (the AppKey, the per-application context, the caller's owner),
``_errors`` (envelopes), ``_middleware`` (the middleware and the route wrapper that
answer errors with them), ``_params`` (bodies, query parameters, page tokens),
``_handlers`` (the routes), ``_sse`` (event streams), ``_guard`` (browsers),
``_app`` (``setup``, ``create_app`` and the helpers), ``_server`` (the runner with
read and keep-alive timeouts that ``taskd serve`` uses). ``health_handler`` and
``metrics_handler`` are ``/health`` and ``/metrics`` for an application to route.
"""

from __future__ import annotations

from ._app import Options, ServeOptions, accepted, bearer_auth, create_app, setup, spawn
from ._context import AuthCallback, get_tracker
from ._errors import RequestError, error_response
from ._guard import BrowserGuard
from ._handlers import health_handler, metrics_handler

__all__ = [
    "AuthCallback",
    "BrowserGuard",
    "Options",
    "RequestError",
    "ServeOptions",
    "accepted",
    "bearer_auth",
    "create_app",
    "error_response",
    "get_tracker",
    "health_handler",
    "metrics_handler",
    "setup",
    "spawn",
]
