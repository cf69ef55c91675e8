"""aiohttp integration: ``setup(app)``, the task routes of the HTTP API, ``create_app``.

The handlers only translate: parse and check the request, send one message through
the tracker, render the reply. One middleware maps taskd's errors and aiohttp's HTTP
errors on taskd's own routes to the error envelope, so no request gets a 500 or a
traceback.

State lives under a ``web.AppKey`` and is read through ``request.config_dict``, so
``get_tracker`` works from sub-applications too (aiojobs' pattern).

Layout: ``_state`` (the AppKey, the state, the caller's owner), ``_errors``
(envelopes and the middleware), ``_params`` (bodies, query parameters, page tokens),
``_handlers`` (the routes), ``_sse`` (event streams), ``_guard`` (browsers),
``_app`` (``setup``, ``create_app`` and the helpers), ``_server`` (the runner with
read and keep-alive timeouts that ``taskd serve`` uses). ``health_handler`` and
``metrics_handler`` are ``/health`` and ``/metrics`` for an application to route.
"""

from __future__ import annotations

from ._app import Options, ServeOptions, accepted, bearer_auth, create_app, setup, spawn
from ._errors import RequestError, error_response
from ._guard import BrowserGuard
from ._handlers import health_handler, metrics_handler
from ._state import AuthCallback, get_tracker

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
