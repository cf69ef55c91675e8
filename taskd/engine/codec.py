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
    MAX_STAGES,
    NO_CHILDREN,
    NO_EXTRA,
    SPAWNED_SPEC,
    Held,
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
    "children_from_text",
    "children_text",
    "held_from_text",
    "held_text",
    "stages_from_text",
    "stages_text",
    "STORED_FIELDS",
    "from_hash",
    "from_row",
    "new_spec",
    "result_text",
    "to_row",
]

# json.dumps with any option builds an encoder per call: each is built once here
# (what each writes is the same; encoding is thread-safe).
_compact: Final = json.JSONEncoder(separators=(",", ":")).encode
_compact_utf8: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: The SQLite columns, in table order: every field with a column type.
COLUMNS: Final = tuple(name for name, _, sql, _ in FIELDS if sql)
#: Columns added after schema version 1 (``ALTER TABLE … ADD COLUMN`` on every file
#: that lacks them: additive, no version bump), with their type.
ADDED_COLUMNS: Final = (
    ("traceparent", "TEXT"),
    ("stage", "TEXT"),
    ("parent_id", "TEXT"),
    ("children", "TEXT"),
    ("await_children", "INTEGER"),
    ("held", "TEXT"),
    ("stages", "TEXT"),
)
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
    parent_id: str | None = None,
    await_children: bool = False,
) -> TaskSpec:
    """The one way a ``TaskSpec`` is made (new tasks, rows, hashes): a shared one
    when every field but ``in_process`` is the default, so most records hold one of
    two specs."""
    if (
        not metadata
        and owner is None
        and callback_url is None
        and heartbeat_timeout is None
        and traceparent is None
        and parent_id is None
        and not await_children
    ):
        return SPAWNED_SPEC if in_process else DEFAULT_SPEC
    return TaskSpec(
        metadata,
        owner,
        in_process,
        callback_url,
        heartbeat_timeout,
        traceparent,
        parent_id,
        await_children,
    )


def children_text(children: Mapping[str, int]) -> str | None:
    """Children counts as stored text (None: none)."""
    return _compact(dict(children)) if children else None


def children_from_text(text: str | None) -> Mapping[str, int]:
    """Children counts from their stored text."""
    if not text:
        return NO_CHILDREN
    counts = {k: int(v) for k, v in json.loads(text).items() if v}
    return MappingProxyType(counts) if counts else NO_CHILDREN


def stages_text(stages: tuple[tuple[str, float, TaskStatus], ...]) -> str | None:
    """Stage changes as stored text: ``[[stage, instant, status], …]`` (None: none)."""
    if not stages:
        return None
    return _compact([[g, at, st.value] for g, at, st in stages])


def stages_from_text(text: str | None) -> tuple[tuple[str, float, TaskStatus], ...]:
    """Stage changes from their stored text (instants may be stored as text)."""
    if not text:
        return ()
    return tuple((g, float(at), TaskStatus(st)) for g, at, st in json.loads(text)[-MAX_STAGES:])


def held_text(held: Held | None) -> str | None:
    """A held outcome as stored text: its status, result text and error (None: none)."""
    if held is None:
        return None
    out: dict[str, str] = {"st": held.status.value}
    if held.result is not None:
        out["rz"] = result_text(held.result)
    if held.error is not None:
        out["er"] = held.error
    return _compact(out)


def held_from_text(text: str | None) -> Held | None:
    """A held outcome from its stored text."""
    if not text:
        return None
    data = json.loads(text)
    rz = data.get("rz")
    return Held(
        TaskStatus(data["st"]),
        None if not rz else result_from_text(rz),
        data.get("er"),
    )


def result_text(data: JSON | RawJSON) -> str:
    """A result as stored text ('' for none): the one encoding every engine uses."""
    if data is None:
        return ""
    if isinstance(data, RawJSON):
        return data.decode()
    if type(data) is int:
        return repr(data)  # (what the encoder writes for one, without its set-up)
    return _compact_utf8(data)


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
        _compact(dict(spec.metadata)) if spec.metadata else None,
        spec.owner,
        1 if spec.in_process else 0,
        spec.callback_url,
        spec.heartbeat_timeout,
        spec.traceparent,
        rec.stage,
        spec.parent_id,
        children_text(rec.children),
        1 if spec.await_children else None,
        held_text(rec.held),
        stages_text(rec.stages),
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
        parent_id,
        children,
        await_children,
        held,
        stages,
    ) = row
    meta = json.loads(metadata) if metadata else None
    spec = new_spec(
        MappingProxyType(meta) if meta else EMPTY_METADATA,
        owner,
        bool(in_process),
        callback_url,
        heartbeat_timeout,
        traceparent,
        parent_id,
        bool(await_children),
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
        NO_EXTRA.but(
            children=children_from_text(children),
            held=held_from_text(held),
            stages=stages_from_text(stages),
        )
        if children or held or stages
        else None,
    )


def from_hash(fields: Mapping[str, str]) -> tuple[TaskRecord, int]:
    """The record from its Redis hash fields (text), and its change's sequence number."""
    values: list[Any] = [fields.get(short) for short in STORED_FIELDS]
    for i in _REAL:
        value = values[i]
        if value is not None:
            values[i] = float(value)
    return from_row(values), int(fields.get(_SEQ, "0"))
