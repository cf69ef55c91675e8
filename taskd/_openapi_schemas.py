"""The OpenAPI document's component schemas (the record, the envelopes, the request
bodies), built from the same constants the handlers enforce; ``_openapi`` puts them
in the document."""

from __future__ import annotations

from typing import Final

from ._errors import ERRORS
from ._models import (
    MAX_MESSAGE_CHARS,
    MAX_RESOURCE_ID_CHARS,
    MAX_STAGES,
    MESSAGE_PATTERN,
    RESOURCE_ID_PATTERN,
    TASK_TYPE_PATTERN,
    TaskStatus,
)

__all__ = ["Doc", "ref", "schemas", "STATUSES"]

STATUSES: Final = [s.value for s in TaskStatus]
_ERROR_CODES: Final = [e.code for e in ERRORS]


Doc = dict[str, object]


def nullable(schema: Doc) -> Doc:
    return {"oneOf": [schema, {"type": "null"}]}


def ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


# Every field of the JSON record, all required: the schema is closed.
_RECORD_FIELDS: Final[Doc] = {
    "task_id": {"type": "string"},
    "task_type": {"type": "string", "pattern": TASK_TYPE_PATTERN},
    "status": {"type": "string", "enum": STATUSES},
    "resource_id": {"type": ["string", "null"]},
    "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
    "created_at_iso": {"type": "string", "format": "date-time"},
    "updated_at_iso": {"type": "string", "format": "date-time"},
    "started_at": {"type": ["number", "null"]},
    "finished_at": {"type": ["number", "null"]},
    "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "message": {"type": ["string", "null"]},
    "result": {},
    "error": {"type": ["string", "null"]},
    "metadata": {"type": "object"},
    "history": {
        "type": "array",
        "maxItems": 3 + MAX_STAGES,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "at"],
            "properties": {
                "status": {"type": "string", "enum": STATUSES},
                "stage": {"type": "string", "description": "a stage change (docs/http-api.md)"},
                "at": {"type": "number"},
            },
        },
    },
    "stage": {
        "type": ["string", "null"],
        "description": "the task's stage (queued, parsing, …), set with progress",
    },
    "traceparent": {
        "type": ["string", "null"],
        "description": "the W3C trace context of the task's span (docs/tracing.md)",
    },
    "parent_id": {
        "type": ["string", "null"],
        "description": "the task this one is a child of (docs/trees.md)",
    },
    "children": {
        "type": "object",
        "description": "counts of the direct children by status, {} when none",
        "propertyNames": {"enum": STATUSES},
        "additionalProperties": {"type": "integer", "minimum": 1},
    },
}


def schemas() -> Doc:
    return {
        "TaskRecord": {
            "type": "object",
            "additionalProperties": False,
            "required": list(_RECORD_FIELDS),
            "properties": _RECORD_FIELDS,
        },
        "RecordEnvelope": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "result"],
            "properties": {"status": {"const": "ok"}, "result": ref("TaskRecord")},
        },
        "ListEnvelope": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "result", "next_page_token"],
            "properties": {
                "status": {"const": "ok"},
                "result": {"type": "array", "items": ref("TaskRecord")},
                "next_page_token": {"type": ["string", "null"]},
            },
        },
        "DeletedEnvelope": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "result", "next_page_token"],
            "properties": {
                "status": {"const": "ok"},
                "result": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["deleted"],
                    "properties": {"deleted": {"type": "integer", "minimum": 0}},
                },
                "next_page_token": {"type": ["string", "null"]},
            },
        },
        "ErrorEnvelope": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "error"],
            "properties": {
                "status": {"const": "error"},
                "error": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "enum": _ERROR_CODES},
                        "message": {"type": "string"},
                        "details": {"type": ["object", "null"]},
                    },
                },
            },
        },
        "CreateTask": {
            "type": "object",
            "additionalProperties": False,
            "required": ["task_type"],
            "properties": {
                "task_type": {"type": "string", "pattern": TASK_TYPE_PATTERN},
                "resource_id": {
                    "type": ["string", "null"],
                    "minLength": 1,
                    "maxLength": MAX_RESOURCE_ID_CHARS,
                    "pattern": RESOURCE_ID_PATTERN,
                },
                "metadata": {"type": ["object", "null"]},
                "callback_url": {"type": ["string", "null"], "format": "uri"},
                "heartbeat_timeout": {"type": ["number", "null"], "exclusiveMinimum": 0},
                "parent_id": {
                    "type": ["string", "null"],
                    "description": "the parent task: the caller's, active, not cancelling",
                },
                "await_children": {
                    "type": ["boolean", "null"],
                    "description": "complete leaves it running until its children end",
                },
            },
        },
        "Progress": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "message": {
                    "type": ["string", "null"],
                    "maxLength": MAX_MESSAGE_CHARS,
                    "pattern": MESSAGE_PATTERN,
                },
                "stage": {
                    "type": ["string", "null"],
                    "pattern": TASK_TYPE_PATTERN,
                    "description": "the task's stage, a short machine-readable name",
                },
            },
        },
        "Complete": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"result": {}},
        },
        "Fail": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Empty": {"type": "object", "additionalProperties": False, "maxProperties": 0},
        "Cancel": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "confirm": {
                    "type": "boolean",
                    "description": "the worker of an external task acknowledges: cancelled",
                }
            },
        },
        "StatsEnvelope": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status", "result"],
            "properties": {
                "status": {"const": "ok"},
                "result": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["active", "records", "finished_per_minute"],
                    "properties": {
                        "active": {"type": "integer", "minimum": 0},
                        "records": {"type": "integer", "minimum": 0},
                        "finished_per_minute": {
                            "type": "array",
                            "maxItems": 60,
                            "items": {
                                "type": "array",
                                "minItems": 4,
                                "maxItems": 4,
                                "items": {"type": "integer", "minimum": 0},
                            },
                        },
                    },
                },
            },
        },
    }
