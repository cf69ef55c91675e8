"""The record codec: how a ``TaskRecord`` is stored, derived from the one field list
(``_models.FIELDS``, beside the record, whose JSON keys derive from it too).

The SQLite columns (``COLUMNS``, ``CREATE_TABLE``) and the Redis hash fields
(``REDIS_FIELDS``: the script's ``FIELDS`` table is generated from them) come from
that list; ``to_row`` gives a record's stored values in its column order and
``from_row`` makes the record back from them, for SQLite and Redis alike, with
``new_spec``, the one ``TaskSpec`` constructor, and ``result_text``, the one encoding
of a result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from .._models import (
    DEFAULT_SPEC,
    EMPTY_METADATA,
    FIELDS,
    JSON,
    RawJSON,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    result_from_text,
)

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "CREATE_TABLE",
    "PAYLOAD",
    "REDIS_FIELDS",
    "STORED_FIELDS",
    "from_hash",
    "from_row",
    "new_spec",
    "result_text",
    "to_row",
]

#: The SQLite columns, in table order: every field with a column type.
COLUMNS: Final = tuple(name for name, _, sql, _ in FIELDS if sql)
#: Columns added after schema version 1 (``ALTER TABLE … ADD COLUMN`` on every file
#: that lacks them: additive, no version bump), with their type.
ADDED_COLUMNS: Final = (("traceparent", "TEXT"), ("stage", "TEXT"))
#: The table, as it has always been written (the text SQLite keeps in the file):
#: version 1's columns; ``ADDED_COLUMNS`` follow.
CREATE_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS tasks ("
    + ",".join(
        f" {name} {sql}" for name, _, sql, _ in FIELDS if sql and name not in dict(ADDED_COLUMNS)
    )
    + ") WITHOUT ROWID"
)
#: The Redis hash fields, in the order the script writes them.
REDIS_FIELDS: Final = tuple(short for _, short, _, _ in FIELDS if short)
#: The Redis hash field of each stored field, in ``COLUMNS`` order.
STORED_FIELDS: Final = tuple(short for _, short, sql, _ in FIELDS if sql)
_SHORT: Final = {name: short for name, short, _, _ in FIELDS}

#: Record fields a change stream entry leaves out: only the record (``t:<id>``)
#: holds them, so a delete removes them from every place they can be read back.
#: Metadata never changes and a result or error is set only on the final version,
#: so the record's current value is the entry's (docs/scale-out.md).
PAYLOAD: Final = (_SHORT["metadata"], _SHORT["result"], _SHORT["error"])

# Redis holds every field as text: these positions (the REAL columns) are numbers.
_REAL: Final = tuple(
    i for i, sql in enumerate(sql for _, _, sql, _ in FIELDS if sql) if sql.startswith("REAL")
)
_SEQ: Final = _SHORT["seq"]


def new_spec(
    metadata: Mapping[str, JSON],
    owner: str | None,
    in_process: bool,
    callback_url: str | None,
    heartbeat_timeout: float | None,
    traceparent: str | None = None,
) -> TaskSpec:
    """The one way a ``TaskSpec`` is made (new tasks, rows, hashes): the shared
    default when every field is the default, so most records hold one spec."""
    if (
        not metadata
        and owner is None
        and not in_process
        and callback_url is None
        and heartbeat_timeout is None
        and traceparent is None
    ):
        return DEFAULT_SPEC
    return TaskSpec(metadata, owner, in_process, callback_url, heartbeat_timeout, traceparent)


def result_text(data: JSON | RawJSON) -> str:
    """A result as stored text ('' for none): the one encoding every engine uses."""
    if data is None:
        return ""
    if isinstance(data, RawJSON):
        return data.text
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def to_row(rec: TaskRecord) -> tuple[object, ...]:
    """A record's stored values, in ``COLUMNS`` order (``test_models`` checks each
    against its column's name): result and metadata as JSON text, None when unset."""
    spec = rec.spec
    return (
        rec.task_id,
        rec.task_type,
        rec.status.value,
        rec.resource_id,
        rec.created_at,
        rec.updated_at,
        rec.started_at,
        rec.finished_at,
        rec.progress,
        rec.message,
        result_text(rec.result_data) or None,
        rec.error,
        json.dumps(dict(spec.metadata), separators=(",", ":")) if spec.metadata else None,
        spec.owner,
        1 if spec.in_process else 0,
        spec.callback_url,
        spec.heartbeat_timeout,
        spec.traceparent,
        rec.stage,
    )


def from_row(row: Sequence[Any]) -> TaskRecord:
    """The record from its stored values in ``COLUMNS`` order (a SQLite row, or a
    Redis hash through ``from_hash``); numbers already numbers."""
    (
        task_id,
        task_type,
        status,
        resource_id,
        created_at,
        updated_at,
        started_at,
        finished_at,
        progress,
        message,
        result,
        error,
        metadata,
        owner,
        in_process,
        callback_url,
        heartbeat_timeout,
        traceparent,
        stage,
    ) = row
    meta = json.loads(metadata) if metadata else None
    spec = new_spec(
        MappingProxyType(meta) if meta else EMPTY_METADATA,
        owner,
        bool(in_process),
        callback_url,
        heartbeat_timeout,
        traceparent,
    )
    return TaskRecord(
        task_id,
        task_type,
        TaskStatus(status),
        resource_id,
        created_at,
        updated_at,
        started_at,
        finished_at,
        progress,
        message,
        # Large results stay text in memory too, as they were before they were stored.
        None if result is None else result_from_text(result),
        error,
        spec,
        stage,
    )


def from_hash(fields: Mapping[str, str]) -> tuple[TaskRecord, int]:
    """The record from its Redis hash fields (text), and its change's sequence number."""
    values: list[Any] = [fields.get(short) for short in STORED_FIELDS]
    for i in _REAL:
        value = values[i]
        if value is not None:
            values[i] = float(value)
    return from_row(values), int(fields.get(_SEQ, "0"))
