"""The API's request handlers, the dashboard page, ``/health`` and ``/metrics``."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Final, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from .. import _metrics, _openapi
from .._args import check_stage
from .._checks import check_limit
from .._models import JSON, TERMINAL, TaskRecord, TaskStatus
from .._tracing import check_traceparent
from ..actor.subscription import Subscription
from ..handle import WouldBlock
from ._context import _JSON, OK_HEAD, OK_TAIL, RETRY_AFTER, SSE_BUFFER, _owner, _State, _state_of
from ._errors import Handler, _invalid, error_response
from ._params import (
    _body,
    _decode_token,
    _encode_token,
    _field,
    _filter_digest,
    _filters,
    _number_query,
    _one_query,
)
from ._sse import _last_event_id, _streamer

log = logging.getLogger("taskd.web")
T = TypeVar("T")

# --- rendering --------------------------------------------------------------------------


def _ok(
    payload: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        # An SSE event's ``data:`` line is the bare ``payload``, one line.
        body=OK_HEAD + payload + OK_TAIL,
        content_type=_JSON,
        headers=headers,
    )


_HEALTHY: Final = b'{"status":"ok"}\n'


def _json_body(value: object) -> bytes:
    """A JSON answer's body: compact, ending with a newline."""
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _record_response(
    state: _State, rec: TaskRecord, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    if rec.status not in TERMINAL:
        headers = dict(headers or ())
        headers["Retry-After"] = RETRY_AFTER
        headers["Cache-Control"] = "no-store"
    return web.Response(
        status=status, body=state.render_ok(rec), content_type=_JSON, headers=headers
    )


# --- handlers ---------------------------------------------------------------------------


_CREATE_FIELDS: Final = frozenset(
    {"task_type", "resource_id", "metadata", "callback_url", "heartbeat_timeout"}
    | {"parent_id", "await_children"}
)


class _Handlers:
    """The API's request handlers, bound to one application's state (no lookups)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def get_task_now(self, request: web.Request) -> web.Response | None:
        """``get_task`` when nothing needs awaiting (no auth, no ``wait``, the read
        fast path applies): the route's wrapper calls it first (``_State.now``)."""
        state = self.state
        if state.auth is not None or request.query_string:
            return None
        task_id = request.match_info["task_id"]
        try:
            rec = state.tracker.get_nowait(task_id, owner=None)
        except WouldBlock:
            return None
        if rec is None:
            raise state.tracker.not_found(task_id)
        return _record_response(state, rec)

    async def get_task(self, request: web.Request) -> web.Response:
        state = self.state
        # The hottest route (every poll): no coroutine for the owner without auth.
        owner = None if state.auth is None else await _owner(request, state)
        task_id = request.match_info["task_id"]
        wait = _number_query(request, "wait") if request.query_string else None
        if wait is None:
            tracker = state.tracker
            try:
                rec = tracker.get_nowait(task_id, owner=owner)
            except WouldBlock:
                rec = await tracker.get(task_id, owner=owner)
            if rec is None:
                raise tracker.not_found(task_id)
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
            try:
                check_limit(limit)
            except ValueError as exc:
                raise _invalid(str(exc), parameter="limit") from None
        stage = _one_query(request, "stage") or None
        if stage is not None:
            try:
                check_stage(stage)
            except ValueError as exc:
                raise _invalid(str(exc), parameter="stage") from None
        parent_id = _one_query(request, "parent_id") or None
        digest = _filter_digest(statuses, task_type, resource_id, stage, parent_id)
        token = _one_query(request, "page_token")
        key = state.tracker.page_key
        cursor = _decode_token(token, digest, key) if token else None
        page = await state.tracker.list_page(
            status=statuses,
            task_type=task_type,
            resource_id=resource_id,
            limit=limit,
            owner=owner,
            cursor=cursor,
            stage=stage,
            parent_id=parent_id,
        )
        next_token = _encode_token(page.next_cursor, digest, key) if page.next_cursor else None
        items = b",".join(state.render(r) for r in page.records)
        body = (
            b'{"status":"ok","result":['
            + items
            + b'],"next_page_token":'
            + json.dumps(next_token).encode()
            + b"}\n"
        )
        headers = {}
        if next_token is not None:
            query: list[tuple[str, str]] = [
                (k, v) for k, v in request.query.items() if k != "page_token"
            ]
            query.append(("page_token", next_token))
            headers["Link"] = f'<{request.path}?{urlencode(query)}>; rel="next"'
        return web.Response(body=body, content_type=_JSON, headers=headers)

    async def delete_tasks(self, request: web.Request) -> web.Response:
        """Bulk delete: the caller's terminal tasks matching the filters (one at
        least), at most 1,000 per call; ``next_page_token`` goes on."""
        state = self.state
        owner = await _owner(request, state)
        statuses, task_type, resource_id = _filters(request)
        before = _number_query(request, "before")
        if statuses is None and task_type is None and resource_id is None and before is None:
            raise _invalid(
                "a bulk delete needs at least one filter: status, task_type, resource_id or before"
            )
        digest = _filter_digest(statuses, task_type, resource_id) + f"|delete|{before!r}"
        token = _one_query(request, "page_token")
        key = state.tracker.page_key
        cursor = _decode_token(token, digest, key) if token else None
        deleted, nxt = await state.tracker.delete_page(
            status=statuses,
            task_type=task_type,
            resource_id=resource_id,
            before=before,
            owner=owner,
            cursor=cursor,
        )
        next_token = _encode_token(nxt, digest, key) if nxt else None
        body = {"status": "ok", "result": {"deleted": deleted}, "next_page_token": next_token}
        return web.Response(body=_json_body(body), content_type=_JSON)

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
            # (the caller's W3C trace context; one that is not valid is ignored)
            traceparent=check_traceparent(request.headers.get("traceparent")),
            parent_id=_field(data, "parent_id", str),
            await_children=_field(data, "await_children", bool) or False,
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
        data = await _body(request, frozenset({"progress", "message", "stage"}))
        rec = await state.tracker.progress(
            request.match_info["task_id"],
            _field(data, "progress", float),
            message=_field(data, "message", str),
            owner=owner,
            stage=_field(data, "stage", str),
        )
        return _record_response(state, rec)

    async def complete_task(self, request: web.Request) -> web.Response:
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, frozenset({"result"}))
        result: JSON = data.get("result")
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
        """202 when this cancel changed the task; 200 with the record as it is when
        it was cancelling or cancelled already (idempotent: a retry changes nothing).
        ``{"confirm": true}``: the worker acknowledges (cancelled)."""
        state = self.state
        owner = await _owner(request, state)
        data = await _body(request, frozenset({"confirm"}))
        confirm = data.get("confirm", False)
        if not isinstance(confirm, bool):
            raise _invalid("field 'confirm' must be a boolean", field="confirm")
        rec, changed = await state.tracker.cancel_changed(
            request.match_info["task_id"], owner=owner, confirm=confirm
        )
        return _record_response(state, rec, 202 if changed else 200)

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
            return await _streamer(request)(state, request, sub, None if sub.resumed else rec)
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
            return await _streamer(request)(state, request, sub, None)
        finally:
            state.tracker.unsubscribe(sub)

    async def stats(self, request: web.Request) -> web.Response:
        """Counts for the dashboard: active tasks, records held, and tasks finished
        per minute over the last hour (with Redis, the deployment's)."""
        state = self.state
        await _owner(request, state)  # with tokens, one is needed (as for /metrics)
        stats = await state.tracker.stats()
        counters = stats.get("finished")
        body = {
            "active": stats.get("active", 0),
            "records": stats.get("records", 0),
            "finished_per_minute": [] if counters is None else counters.per_minute(),
        }
        return _ok(json.dumps(body, separators=(",", ":")).encode())

    async def openapi_doc(self, request: web.Request) -> web.Response:
        state = self.state
        doc = _openapi.document(
            prefix=state.api_base(),
            auth=state.auth is not None,
            max_wait=state.max_wait,
            max_body=state.max_body,
        )
        return web.Response(body=_json_body(doc), content_type=_JSON)


def routes(h: _Handlers, p: str) -> list[tuple[str, dict[str, Handler]]]:
    """The API's routes under ``p``: (path, handler by method), one table for every
    framework that serves them (aiohttp here, ``taskd.asgi``)."""
    return [
        # (the hottest route first: aiohttp tries a prefix's resources in this order)
        (p + "/tasks/{task_id}", {"GET": h.get_task, "DELETE": h.delete_task}),
        (p + "/tasks", {"GET": h.list_tasks, "POST": h.create_task, "DELETE": h.delete_tasks}),
        (p + "/tasks/{task_id}/start", {"POST": h.start_task}),
        (p + "/tasks/{task_id}/progress", {"POST": h.progress_task}),
        (p + "/tasks/{task_id}/complete", {"POST": h.complete_task}),
        (p + "/tasks/{task_id}/fail", {"POST": h.fail_task}),
        (p + "/tasks/{task_id}/cancel", {"POST": h.cancel_task}),
        (p + "/tasks/{task_id}/events", {"GET": h.task_events}),
        (p + "/events", {"GET": h.events}),
        (p + "/stats", {"GET": h.stats}),
        (p + "/openapi.json", {"GET": h.openapi_doc}),
    ]


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


async def health_handler(request: web.Request) -> web.Response:
    """``GET /health``: 200 ``{"status":"ok"}``, or 503 ``UNAVAILABLE`` with the
    reason while the tracker's store cannot write (or the tracker is closed). Add it
    to an application ``setup`` was called on:
    ``app.router.add_get("/health", taskd.web.health_handler)``."""
    reason = _state_of(request).tracker.health()
    if reason is not None:
        return error_response(503, "UNAVAILABLE", reason, None, {"Retry-After": RETRY_AFTER})
    return web.Response(body=_HEALTHY, content_type=_JSON)


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: the tracker's Prometheus exposition (OpenMetrics when the
    scraper asks for it), as ``taskd serve`` answers it. Add it to an application
    ``setup`` was called on:
    ``app.router.add_get("/metrics", taskd.web.metrics_handler)``. With ``auth``,
    a scrape needs credentials too (task types name every owner's work). The HTTP
    request series are those of ``create_app``'s own routes, so an embedding
    application gets the task series only (and, with Redis, every process's
    per-process series, labelled ``process``)."""
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
    body, content_type = _metrics.render(stats, accept=request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
