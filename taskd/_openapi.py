"""The OpenAPI 3.1 document of the HTTP API, built as plain data (no aiohttp here).

It is built from the same constants the handlers enforce — the task_type pattern,
the page-size cap, statuses, the error table, the configured long-poll cap and body
limit — so the document and the behaviour cannot drift apart silently; the tests
validate it and run schemathesis against a live server. (HTTP success codes are
written per route: they are the contract itself.)
"""

from __future__ import annotations

from typing import Final

from ._models import (
    MAX_LIMIT,
    MAX_RESOURCE_ID_CHARS,
    RESOURCE_ID_PATTERN,
)
from ._openapi_schemas import STATUSES
from ._openapi_schemas import Doc as _Doc
from ._openapi_schemas import ref as _ref
from ._openapi_schemas import schemas as _schemas

__all__ = ["document"]

_STATUSES: Final = STATUSES


def _error(description: str, headers: _Doc | None = None) -> _Doc:
    out: _Doc = {
        "description": description,
        "content": {"application/json": {"schema": _ref("ErrorEnvelope")}},
    }
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER: Final[_Doc] = {"Retry-After": {"schema": {"type": "string"}}}
_ACTIVE_HEADERS: Final = {
    "Retry-After": {
        "description": "Present while the task is not terminal: seconds before polling again",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "`no-store` while the task is not terminal",
        "schema": {"type": "string"},
    },
}


def _record(description: str, extra_headers: _Doc | None = None) -> _Doc:
    return {
        "description": description,
        "headers": {**_ACTIVE_HEADERS, **(extra_headers or {})},
        "content": {"application/json": {"schema": _ref("RecordEnvelope")}},
    }


def _body(schema: str, *, required: bool) -> _Doc:
    return {
        "required": required,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


_LAST_EVENT_ID: Final[_Doc] = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Resume after this event id, if the server still holds the events",
    "schema": {"type": "string"},
}


_TRACEPARENT: Final[_Doc] = {
    "name": "traceparent",
    "in": "header",
    "required": False,
    "description": "The caller's W3C trace context: the task's span is its child, and "
    "the record's traceparent continues the trace (docs/tracing.md). One that is not "
    "W3C trace context is ignored, as the W3C rules say.",
    "schema": {"type": "string"},
}


def _list_filters() -> list[_Doc]:
    return [
        {
            "name": "status",
            "in": "query",
            "description": "Repeatable; values may also be comma-separated; "
            "an empty value means no filter",
            "schema": {"type": "array", "items": {"type": "string", "enum": [*_STATUSES, ""]}},
            "style": "form",
            "explode": True,
        },
        {
            "name": "task_type",
            "in": "query",
            "description": "An empty value means no filter",
            "schema": {"type": "string", "pattern": "^([A-Za-z0-9_.:-]{1,128})?$"},
        },
        {
            "name": "resource_id",
            "in": "query",
            "description": "An empty value means no filter",
            "schema": {
                "type": "string",
                "maxLength": MAX_RESOURCE_ID_CHARS,
                "pattern": RESOURCE_ID_PATTERN,
            },
        },
    ]


def _sse(description: str) -> _Doc:
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }


def _responses(own: dict[str, _Doc], common: dict[str, _Doc]) -> _Doc:
    return {**own, **common}


def document(
    *, prefix: str, auth: bool, max_wait: float = 60.0, max_body: int = 1024 * 1024
) -> _Doc:
    """The OpenAPI 3.1 document for routes mounted under ``prefix``."""
    common: dict[str, _Doc] = {
        "503": _error(
            "Tracker full of active tasks, shutting down, or its store cannot write",
            _RETRY_AFTER,
        ),
        "403": _error("A cross-site request, or a Host that is not allowed (taskd serve)"),
    }
    if auth:
        common["401"] = _error("Missing or invalid credentials")
    bad = _error("Invalid query or body values, or malformed JSON")
    missing = _error(
        "Unknown, expired or evicted task, or another owner's; details.hint (naming "
        "--redis) when another process minted the id since this one started"
    )
    too_large = _error(f"Request body over the limit ({max_body} bytes here)")
    precondition = _error("The transition is not allowed from the task's current status")
    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }

    def mutation(
        summary: str, op_id: str, body: _Doc, ok: str, status: str = "200", **more: _Doc
    ) -> _Doc:
        return {
            "post": {
                "summary": summary,
                "operationId": op_id,
                "parameters": [task_id],
                "requestBody": body,
                "responses": _responses(
                    {
                        status: _record(ok),
                        **more,
                        "400": bad,
                        "404": missing,
                        "409": precondition,
                        "413": too_large,
                    },
                    common,
                ),
            }
        }

    paths: _Doc = {
        f"{prefix}/tasks": {
            "get": {
                "summary": "List tasks, newest first",
                "operationId": "listTasks",
                "parameters": [
                    *_list_filters(),
                    {
                        "name": "stage",
                        "in": "query",
                        "description": "Tasks at this stage; an empty value means no filter",
                        "schema": {"type": "string", "pattern": "^([A-Za-z0-9_.:-]{1,128})?$"},
                    },
                    {
                        "name": "parent_id",
                        "in": "query",
                        "description": "The children of this task (docs/trees.md)",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": 50,
                        },
                    },
                    {
                        "name": "page_token",
                        "in": "query",
                        "description": "Opaque: `next_page_token` of the previous page",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": _responses(
                    {
                        "200": _Doc(
                            description="One page of tasks",
                            headers={
                                "Link": {
                                    "description": 'The next page: `<url>; rel="next"`',
                                    "schema": {"type": "string"},
                                }
                            },
                            content={"application/json": {"schema": _ref("ListEnvelope")}},
                        ),
                        "400": bad,
                    },
                    common,
                ),
            },
            "delete": {
                "summary": "Delete the caller's terminal tasks matching the filters (one at "
                "least), at most 1,000 per call; active tasks are never deleted",
                "operationId": "deleteTasks",
                "parameters": [
                    *_list_filters(),
                    {
                        "name": "before",
                        "in": "query",
                        "description": "Only tasks created before this Unix time (seconds)",
                        "schema": {"type": "number"},
                    },
                    {
                        "name": "page_token",
                        "in": "query",
                        "description": "Opaque: `next_page_token` of the previous call",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": _responses(
                    {
                        "200": _Doc(
                            description="How many were deleted; `next_page_token` goes on",
                            content={"application/json": {"schema": _ref("DeletedEnvelope")}},
                        ),
                        "400": bad,
                    },
                    common,
                ),
            },
            "post": {
                "summary": "Register an external task (it starts pending)",
                "operationId": "createTask",
                "parameters": [_TRACEPARENT],
                "requestBody": _body("CreateTask", required=True),
                "responses": _responses(
                    {
                        "201": {
                            **_record(
                                "Created",
                                {"Location": {"required": True, "schema": {"type": "string"}}},
                            ),
                            # Links let stateful testers (schemathesis) chain create ->
                            # the per-task operations with the new id.
                            "links": {
                                op: {
                                    "operationId": op,
                                    "parameters": {"task_id": "$response.body#/result/task_id"},
                                }
                                for op in (
                                    "getTask",
                                    "deleteTask",
                                    "startTask",
                                    "reportProgress",
                                    "completeTask",
                                    "failTask",
                                    "cancelTask",
                                )
                            },
                        },
                        "400": bad,
                        "404": _error(
                            "NOT_FOUND: the parent_id names no task the caller can see "
                            "(docs/trees.md)"
                        ),
                        "409": _error(
                            "CONFLICT: an active task holds the same (task_type, resource_id); "
                            "details.task_id names it. FAILED_PRECONDITION: the parent is "
                            "finished or cancelling"
                        ),
                        "413": too_large,
                        "429": _error(
                            "RESOURCE_EXHAUSTED: the owner's max_active_per_owner is reached",
                            _RETRY_AFTER,
                        ),
                    },
                    common,
                ),
            },
        },
        f"{prefix}/tasks/{{task_id}}": {
            "get": {
                "summary": "Get a task; with ?wait=S, long-poll until terminal or S seconds",
                "operationId": "getTask",
                "parameters": [
                    task_id,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_wait},
                    },
                ],
                "responses": _responses(
                    {
                        "200": _record("The task (the latest state when a long-poll times out)"),
                        "400": bad,
                        "404": missing,
                    },
                    common,
                ),
            },
            "delete": {
                "summary": "Delete a terminal task",
                "operationId": "deleteTask",
                "parameters": [task_id],
                "responses": _responses(
                    {
                        "204": _Doc(description="Deleted"),
                        "404": missing,
                        "409": _error("The task is still active"),
                    },
                    common,
                ),
            },
        },
        f"{prefix}/tasks/{{task_id}}/start": mutation(
            "Mark a pending external task running",
            "startTask",
            _body("Empty", required=False),
            "Running",
        ),
        f"{prefix}/tasks/{{task_id}}/progress": mutation(
            "Report progress; the answer's status is `cancelling` if cancellation was asked",
            "reportProgress",
            _body("Progress", required=False),
            "The updated task",
        ),
        f"{prefix}/tasks/{{task_id}}/complete": mutation(
            "Complete a running task", "completeTask", _body("Complete", required=False), "Done"
        ),
        f"{prefix}/tasks/{{task_id}}/fail": mutation(
            "Fail an active task (the error is redacted)",
            "failTask",
            _body("Fail", required=True),
            "Failed",
        ),
        f"{prefix}/tasks/{{task_id}}/cancel": mutation(
            "Cancel a task: cancelling (running) or cancelled; idempotent on a task "
            "cancelling or cancelled already (200, the record unchanged); "
            '`{"confirm": true}`: the worker acknowledges (cancelled)',
            "cancelTask",
            _body("Cancel", required=False),
            "Cancellation accepted: the record changed",
            "202",
            **{"200": _record("Cancelling or cancelled already: the record as it is")},
        ),
        f"{prefix}/tasks/{{task_id}}/events": {
            "get": {
                "summary": "Server-Sent Events: the current state, then each change; "
                "ends after the terminal one",
                "operationId": "taskEvents",
                "parameters": [task_id, _LAST_EVENT_ID],
                "responses": _responses(
                    {
                        "200": _sse(
                            "One event per change: `id` a sequence number, `data` the record JSON"
                        ),
                        "204": _Doc(description="Reconnect after the task ended: stop"),
                        "404": missing,
                    },
                    common,
                ),
            }
        },
        f"{prefix}/events": {
            "get": {
                "summary": "Server-Sent Events of every change visible to the caller",
                "operationId": "events",
                "parameters": [*_list_filters(), _LAST_EVENT_ID],
                "responses": _responses(
                    {"200": _sse("One event per change, filtered"), "400": bad}, common
                ),
            }
        },
        f"{prefix}/stats": {
            "get": {
                "summary": "Counts for the dashboard: tasks finished per minute, last hour",
                "operationId": "stats",
                "responses": _responses(
                    {
                        "200": {
                            "description": "Active tasks, records held, and the last 60 "
                            "minutes oldest first: [minute start (Unix s), completed, "
                            "failed, cancelled]",
                            "content": {"application/json": {"schema": _ref("StatsEnvelope")}},
                        }
                    },
                    common,
                ),
            }
        },
        f"{prefix}/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
    components: _Doc = {"schemas": _schemas()}
    doc: _Doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "taskd",
            "version": "1",
            "description": "Track background operations: poll, long-poll, list, report.",
        },
        # Paths carry the API's full mount path (a sub-application's prefix included),
        # so the server is the site root.
        "servers": [{"url": "/", "description": "this server"}],
        "paths": paths,
        "components": components,
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
