"""Wiring: ``setup``, ``create_app``, ``bearer_auth``, and the helpers for an
application's own handlers (``spawn``, ``accepted``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, Final, TypedDict, TypeVar, Unpack

from aiohttp import web

from .._checks import check_seconds
from .._models import JSON, TaskRecord
from .._retention import Retention
from .._webhooks import Webhooks
from ..engine.store import Store
from ..handle import TaskHandle
from ..tracker import Tracker
from ._context import (
    _ROUTE_LIST,
    _STATE,
    MAX_BODY,
    MAX_WAIT,
    AuthCallback,
    _owner,
    _State,
    _state_of,
)
from ._errors import Handler, method_not_allowed
from ._guard import BrowserGuard, Screen
from ._handlers import (
    _dashboard_handler,
    _Handlers,
    _ok,
    health_handler,
    metrics_handler,
    routes,
)
from ._middleware import enveloped, make_middleware, route_wrapper

log = logging.getLogger("taskd.web")
T = TypeVar("T")

# --- wiring -----------------------------------------------------------------------------


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError("prefix must be a str")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise ValueError("prefix must start with '/' and not end with '/' (or be empty)")
    return prefix


class Options(TypedDict, total=False):
    """The options ``setup`` and ``create_app`` share, all keyword-only (the table in
    docs/embedding.md gives each one's default and meaning)."""

    retention: Retention | None
    store: Store | None
    close_timeout: float
    cancel_grace: float
    prefix: str
    auth: AuthCallback | None
    max_wait: float
    webhooks: Webhooks | None
    sse_ping_interval: float
    #: A redis:// URL: the task space lives in Redis, shared by every process using it.
    redis: str | None
    redis_prefix: str
    #: The URL of any node of a Redis Cluster: the same, sharded by owner.
    redis_cluster: str | None


class SetupOptions(Options, total=False):
    """``setup``'s options: the shared ones, and where to serve the dashboard."""

    dashboard: bool | str


class ServeOptions(Options, total=False):
    """``create_app``'s options: the shared ones, and the standalone server's."""

    client_max_size: int
    demo: bool
    #: Seed of the demo's random jobs (tests use one, for a repeatable run).
    demo_seed: int | None
    guard: BrowserGuard | None


def _check_keys(options: Mapping[str, object], allowed: type, where: str) -> None:
    unknown = set(options) - set(allowed.__annotations__) - set(Options.__annotations__)
    if unknown:
        raise TypeError(f"{where}() got unexpected option(s): {', '.join(sorted(unknown))}")


def setup(app: web.Application, **options: Unpack[SetupOptions]) -> Tracker:
    """Install a tracker on ``app`` and register the task routes under ``prefix``.

    The tracker is opened and closed by a ``cleanup_ctx``: on cleanup it stops taking
    commands, gives running spawned tasks ``close_timeout`` seconds, then cancels them
    and records them cancelled. ``auth(request)`` returns the caller's owner or raises
    ``web.HTTPUnauthorized``; each caller sees only its own tasks. ``max_wait`` caps
    the long-poll ``?wait=`` (60 seconds, the most allowed). ``webhooks`` turns on
    signed callbacks; ``sse_ping_interval`` paces event-stream keep-alives;
    ``dashboard=True`` serves the dashboard page at ``/dashboard`` (or at the path
    given as a string). See ``Options``.
    """
    _check_keys(options, SetupOptions, "setup")
    return _setup(app, options, options.get("dashboard", False), metrics=False)


def _setup(
    app: web.Application,
    options: Options,
    dashboard: bool | str,
    *,
    metrics: bool,
    screen: Screen | None = None,
) -> Tracker:
    if not isinstance(app, web.Application):
        raise TypeError(f"setup() needs an aiohttp web.Application, not {type(app).__name__}")
    if _STATE in app:
        raise RuntimeError("taskd.web.setup() was already called on this application")
    state = make_state(options, metrics=metrics)
    tracker = state.tracker
    state.app = app
    app[_STATE] = state

    shared = options.get("redis") is not None or options.get("redis_cluster") is not None

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if not shared:
            _warn_if_many_gunicorn_workers()
        async with tracker:
            yield

    app.cleanup_ctx.append(lifecycle)
    return _wire(app, state, dashboard, metrics=metrics, screen=screen)


#: The options that make a tracker (not taken with ``tracker=``: it is made already).
_TRACKER_OPTIONS: Final = frozenset(
    {"retention", "store", "close_timeout", "cancel_grace", "webhooks", "redis", "redis_prefix"}
    | {"redis_cluster"}
)


def make_state(options: Options, *, metrics: bool, tracker: Tracker | None = None) -> _State:
    """The application's state from the options, with a tracker made from them (or
    the one given, when none of the tracker's own options are)."""
    retention = options.get("retention")
    store = options.get("store")
    close_timeout = options.get("close_timeout", 5.0)
    cancel_grace = options.get("cancel_grace", 60.0)
    prefix = options.get("prefix", "/api/v1")
    auth = options.get("auth")
    max_wait = options.get("max_wait", MAX_WAIT)
    webhooks = options.get("webhooks")
    sse_ping_interval = options.get("sse_ping_interval", 15.0)
    if auth is not None and not callable(auth):
        raise TypeError("auth must be callable")
    wait_cap = check_seconds(max_wait, "max_wait")
    ping = check_seconds(sse_ping_interval, "sse_ping_interval")
    if wait_cap is None or ping is None:
        raise TypeError("max_wait and sse_ping_interval must be numbers of seconds")
    if wait_cap > MAX_WAIT:
        raise ValueError(f"max_wait must be <= {MAX_WAIT:g}")
    if tracker is None:
        tracker = Tracker(
            retention=retention,
            store=store,
            close_timeout=close_timeout,
            cancel_grace=cancel_grace,
            webhooks=webhooks,
            redis=options.get("redis"),
            redis_prefix=options.get("redis_prefix", "taskd:"),
            redis_cluster=options.get("redis_cluster"),
        )
    elif not isinstance(tracker, Tracker):
        raise TypeError(f"tracker must be a taskd.Tracker, not {type(tracker).__name__}")
    elif given := sorted(_TRACKER_OPTIONS & set(options)):
        raise TypeError(f"{', '.join(given)}: options of a tracker made here; one was given")
    return _State(
        tracker, _check_prefix(prefix), auth, wait_cap, ping, tracker.http if metrics else None
    )


def _wire(
    app: web.Application,
    state: _State,
    dashboard: bool | str,
    *,
    metrics: bool,
    screen: Screen | None,
) -> Tracker:
    tracker = state.tracker

    async def end_streams(app: web.Application) -> None:
        # Runs before the server waits for open requests: event streams and long-polls
        # would otherwise hold shutdown until their clients hang up or time out.
        for sub in list(state.streams):
            sub.end()
        await tracker.release_polls()

    app.on_shutdown.append(end_streams)
    p = state.prefix
    handlers = _Handlers(state)
    table = routes(handlers, p)
    state.now[handlers.get_task] = handlers.get_task_now
    if dashboard:
        path = dashboard if isinstance(dashboard, str) else "/dashboard"
        table.append((path, {"GET": _dashboard_handler(state)}))
    if metrics:
        # The standalone app: each route wrapped (guard, envelope, metrics), and no
        # middleware at all (app_routes adds /health, /metrics and the catch-all).
        state.wrap = route_wrapper(state, screen)
    else:
        # A host's app: its middleware answers taskd's exceptions from its handlers;
        # taskd's own routes are each enveloped.
        app.middlewares.append(make_middleware())
    for path, methods in table:
        add_routes(app, state, path, methods, name=_ROUTE_LIST if path == p + "/tasks" else None)
    return tracker


def add_routes(
    app: web.Application,
    state: _State,
    path: str,
    methods: Mapping[str, Handler],
    name: str | None = None,
) -> None:
    """Register ``path``'s handlers, and 405 with ``Allow`` (in the envelope) for any
    other method: each wrapped as the application wants (``_State.wrap``)."""
    wrap = state.wrap
    resource = app.router.add_resource(path, name=name)
    for method, handler in methods.items():
        resource.add_route(method, enveloped(handler) if wrap is None else wrap(handler, path))
    # (a "*" route goes last: the declared methods match first)
    refuse = method_not_allowed(methods)
    resource.add_route("*", refuse if wrap is None else wrap(refuse, path))


def _warn_if_many_gunicorn_workers() -> None:
    """One WARNING per worker when gunicorn runs this application in more than one
    worker and the task space is the process's own: a task created through one
    worker is then 404 on every other (docs/embedding.md)."""
    workers = _gunicorn_workers()
    if workers is not None and workers > 1:
        log.warning(
            "taskd runs under gunicorn with %d workers and no shared store: each worker "
            "keeps its own tasks, so a task created through one worker is 404 on the "
            "others; pass redis=URL to taskd.web.setup() or create_app(), or run one worker",
            workers,
        )


def _gunicorn_workers() -> int | None:
    """How many workers the gunicorn running this process has (its ``--workers``,
    from whichever source it came), or None when not run by gunicorn."""
    # gunicorn's arbiter sets SERVER_SOFTWARE in its environment, which its workers
    # inherit; the worker module is loaded in a worker process.
    base = sys.modules.get("gunicorn.workers.base")
    if base is None or not os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn"):
        return None
    worker_class = base.Worker
    # aiohttp's GunicornWebWorker starts the application inside its own ``_run``
    # task: that coroutine's ``self`` is the worker, which holds gunicorn's config.
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    worker = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(worker, worker_class):
        # Another worker class: look for the worker object itself (once, at start).
        worker = next((o for o in gc.get_objects() if isinstance(o, worker_class)), None)
    count = getattr(getattr(worker, "cfg", None), "workers", None)
    return count if isinstance(count, int) else None


def create_app(**options: Unpack[ServeOptions]) -> web.Application:
    """The standalone application: the task API under ``prefix``, ``/health``,
    ``/metrics`` and the dashboard at ``/``; with ``demo``, a stream of simulated
    jobs. ``guard`` (default: a ``BrowserGuard`` that checks ``Host`` when there is no
    ``auth``) refuses cross-site writes and, without tokens, foreign ``Host`` values.
    See ``ServeOptions``."""
    _check_keys(options, ServeOptions, "create_app")
    guard = options.get("guard")
    if guard is None:
        guard = BrowserGuard(check_host=options.get("auth") is None)
    elif not isinstance(guard, BrowserGuard):
        raise TypeError("guard must be a taskd.web.BrowserGuard")
    app = web.Application(client_max_size=options.get("client_max_size", MAX_BODY))
    # One middleware applies the guard (first) and taskd's envelopes and counts: each
    # middleware is a coroutine frame on every request of the hottest route.
    tracker = _setup(app, options, "/", metrics=True, screen=guard.screen())
    state = _state_of(app)
    state.max_body = options.get("client_max_size", MAX_BODY)
    add_routes(app, state, "/health", {"GET": health_handler})
    add_routes(app, state, "/metrics", {"GET": metrics_handler})
    # Any other path: 404 in the envelope, counted as "(unmatched)" (resolved last:
    # every other resource's prefix is longer than the root's).
    assert state.wrap is not None
    app.router.add_route("*", "/{tail:.*}", state.wrap(_unmatched, "(unmatched)"))
    if options.get("demo", False):

        async def demo_jobs(app: web.Application) -> AsyncIterator[None]:
            from .._demo import run_demo

            job = asyncio.get_running_loop().create_task(
                run_demo(tracker, seed=options.get("demo_seed")), name="taskd-demo"
            )
            yield
            job.cancel()  # cleanup runs this before the tracker's: stop feeding it first
            with contextlib.suppress(asyncio.CancelledError):
                await job

        app.cleanup_ctx.append(demo_jobs)
    return app


async def _unmatched(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


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

    ``TaskConflict`` and other taskd errors raised here may be caught by the handler;
    if they are not, the middleware ``setup`` installed answers them with the error
    envelope (it answers taskd's own exceptions only).
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
