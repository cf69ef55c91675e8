"""The record codec's one field list: each ``TaskRecord`` field and its short name
as a Redis hash field (the script's ``FIELDS`` table is generated from it), and the
fields only a record holds, never a change stream entry (``PAYLOAD``)."""

from __future__ import annotations

import json
from typing import Final

from .._models import JSON, RawJSON

__all__ = ["FIELDS", "PAYLOAD", "REDIS_FIELDS", "result_text"]

#: (record attribute, Redis hash field), in the order a record is written.
FIELDS: Final = (
    ("task_id", "id"),
    ("task_type", "ty"),
    ("status", "st"),
    ("resource_id", "rs"),
    ("created_at", "ca"),
    ("updated_at", "ua"),
    ("started_at", "sa"),
    ("finished_at", "fa"),
    ("progress", "pg"),
    ("message", "ms"),
    ("result", "rz"),
    ("error", "er"),
    ("metadata", "md"),
    ("owner", "ow"),
    ("callback_url", "cb"),
    ("heartbeat_timeout", "hb"),
    ("in_process", "ip"),
    # Not record fields: the process that runs a spawned task, the change's sequence.
    ("process", "pr"),
    ("seq", "sq"),
)
REDIS_FIELDS: Final = tuple(short for _, short in FIELDS)

#: Record fields a change stream entry leaves out: only the record (``t:<id>``)
#: holds them, so a delete removes them from every place they can be read back.
#: Metadata never changes and a result or error is set only on the final version,
#: so the record's current value is the entry's (docs/scale-out.md).
PAYLOAD: Final = ("md", "rz", "er")


def result_text(data: JSON | RawJSON) -> str:
    """A result as stored text ('' for none): the one encoding every engine uses."""
    if data is None:
        return ""
    if isinstance(data, RawJSON):
        return data.text
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
