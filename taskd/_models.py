"""The task record, its statuses and the transition table.

Pure data and validation: no asyncio, no aiohttp. Records are frozen and slotted, so
the actor hands the same object to every reader without copying it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final, TypeAlias, cast

import msgspec

__all__ = [
    "ACTIVE",
    "JSON",
    "Extra",
    "Held",
    "TERMINAL",
    "TRANSITIONS",
    "TaskRecord",
    "TaskStatus",
]

#: A JSON value: what ``json.loads`` gives, and what taskd accepts (any sequence or
#: mapping of JSON values, so that ``dict[str, list[int]]`` type-checks).
JSON: TypeAlias = bool | int | float | str | Sequence["JSON"] | Mapping[str, "JSON"] | None

MAX_METADATA_BYTES = 16 * 1024
#: The stage changes a record's ``history`` keeps (the latest).
MAX_STAGES = 16
MAX_MESSAGE_CHARS = 1024
MAX_RESOURCE_ID_CHARS = 256
_TASK_TYPE_CHARS = r"[A-Za-z0-9_.:-]{1,128}"
#: The task_type rule as a JSON Schema pattern (the OpenAPI document uses it).
TASK_TYPE_PATTERN = f"^{_TASK_TYPE_CHARS}$"
#: The most records one listing page may hold.
MAX_LIMIT = 200
#: The resource_id and message rules as JSON Schema patterns (the OpenAPI document).
RESOURCE_ID_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
MESSAGE_PATTERN = "^[^\\u0000]*$"


class TaskStatus(enum.StrEnum):
    """The lifecycle status of a task; the string value is what JSON shows."""

    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``."""
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.CANCELLING})

#: Allowed moves; anything absent is an ``InvalidTransition``.
TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = MappingProxyType(
    {
        TaskStatus.PENDING: frozenset(
            {TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}
        ),
        TaskStatus.RUNNING: frozenset(
            {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLING, TaskStatus.CANCELLED}
        ),
        TaskStatus.CANCELLING: frozenset(
            {TaskStatus.CANCELLED, TaskStatus.COMPLETED, TaskStatus.FAILED}
        ),
        TaskStatus.COMPLETED: frozenset(),
        TaskStatus.FAILED: frozenset(),
        TaskStatus.CANCELLED: frozenset(),
    }
)

# One shared empty mapping: most tasks carry no metadata, and an empty dict per record
# would cost 64 bytes each.
EMPTY_METADATA: Mapping[str, JSON] = MappingProxyType({})


def iso(ts: float) -> str:
    """RFC 3339 UTC text of a Unix timestamp, microsecond precision, ``Z`` suffix."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TaskSpec(msgspec.Struct, frozen=True, gc=False):
    """What a task was created with and never changes.

    Every version of a record shares one ``TaskSpec`` (most share the default one), so
    the rarely-set fields cost a record one slot instead of five and ``evolve`` copies
    a single pointer for them.
    """

    metadata: Mapping[str, JSON] = EMPTY_METADATA
    #: Who created it (``None`` without auth); stored, never rendered.
    owner: str | None = None
    #: True when the tracker itself runs the work (``spawn``); such tasks cannot
    #: survive a restart of the process.
    in_process: bool = False
    callback_url: str | None = None
    heartbeat_timeout: float | None = None
    #: The W3C trace context of the task's span (docs/tracing.md), or the one the
    #: creator sent when no tracer records spans here.
    traceparent: str | None = None
    #: The task this one is a child of (docs/trees.md), or None.
    parent_id: str | None = None
    #: ``complete`` leaves it running until its children are terminal (docs/trees.md).
    await_children: bool = False


DEFAULT_SPEC = TaskSpec()
#: The spec of a spawned task created with every other field the default: shared,
#: like ``DEFAULT_SPEC`` (most spawns), so a spawn allocates no spec of its own.
SPAWNED_SPEC = TaskSpec(in_process=True)
#: No children: one shared empty mapping (most records).
NO_CHILDREN: Mapping[str, int] = MappingProxyType({})


class Held(msgspec.Struct, frozen=True, gc=False):
    """The terminal outcome of a task whose own work has ended but whose descendants
    are still active (docs/trees.md): applied once the last of them is terminal."""

    status: TaskStatus
    result: JSON | RawJSON = None
    error: str | None = None


class Extra(msgspec.Struct, frozen=True, gc=False):
    """A record's rarely-set changing fields, in one slot (most records have none)."""

    #: Counts of the direct children held, by status (docs/trees.md).
    children: Mapping[str, int] = NO_CHILDREN
    #: The outcome waiting for the descendants to end (never rendered).
    held: Held | None = None
    #: The latest stage changes, oldest first: (stage, instant, status then), at most
    #: ``MAX_STAGES`` (rendered in ``history``).
    stages: tuple[tuple[str, float, TaskStatus], ...] = ()

    def but(self, **changes: object) -> Extra | None:
        """A copy with ``changes``; None when every field is back to its default."""
        new = msgspec.structs.replace(self, **changes)
        return None if new == NO_EXTRA else new


#: The defaults: ``extra`` of a record without any is None, read as this.
NO_EXTRA: Final = Extra()


#: A record's fields, once: (attribute, also the SQLite column and the JSON key; Redis
#: hash field; SQLite column type; rendered in JSON?), '' for none, in column and key
#: order. SQLite columns, Redis hash fields (``engine.codec``) and JSON keys
#: (``to_dict``) all derive from it. Some are only rendered, some never; two are
#: Redis's own: the process running a spawned task, and a change's sequence number.
FIELDS: Final[tuple[tuple[str, str, str, bool], ...]] = (
    ("task_id", "id", "TEXT PRIMARY KEY", True),
    ("task_type", "ty", "TEXT NOT NULL", True),
    ("status", "st", "TEXT NOT NULL", True),
    ("resource_id", "rs", "TEXT", True),
    ("created_at", "ca", "REAL NOT NULL", True),
    ("updated_at", "ua", "REAL NOT NULL", True),
    ("created_at_iso", "", "", True),
    ("updated_at_iso", "", "", True),
    ("started_at", "sa", "REAL", True),
    ("finished_at", "fa", "REAL", True),
    ("progress", "pg", "REAL", True),
    ("message", "ms", "TEXT", True),
    ("result", "rz", "TEXT", True),
    ("error", "er", "TEXT", True),
    ("metadata", "md", "TEXT", True),
    ("history", "", "", True),
    ("owner", "ow", "TEXT", False),
    ("in_process", "ip", "INTEGER NOT NULL", False),
    ("callback_url", "cb", "TEXT", False),
    ("heartbeat_timeout", "hb", "REAL", False),
    ("traceparent", "tp", "TEXT", True),
    ("stage", "sg", "TEXT", True),
    ("parent_id", "pa", "TEXT", True),
    ("children", "ch", "TEXT", True),
    ("await_children", "aw", "INTEGER", False),
    ("held", "hd", "TEXT", False),
    ("stages", "sh", "TEXT", False),
    ("process", "pr", "", False),
    ("seq", "sq", "", False),
)
#: The keys of a record's JSON object, in order.
JSON_KEYS: Final = tuple(name for name, _, _, rendered in FIELDS if rendered)


class TaskRecord(msgspec.Struct, frozen=True, gc=False):
    """One tracked task, immutable: every change produces a new record.

    The fields are those of the JSON record, except that ``metadata`` and the
    stored-but-never-rendered ``owner``, ``in_process``, ``callback_url`` and
    ``heartbeat_timeout`` live in ``spec`` (and read through properties), and that
    a ``result`` that is an object or an array is held as its compact JSON text
    (``result_data``, ``RawJSON`` bytes) and decoded when read: a small dict costs a
    quarter of its decoded size so, and parsed JSON of ``[[],[],…]`` ~25 times its text.
    """

    task_id: str
    task_type: str
    status: TaskStatus
    resource_id: str | None
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    message: str | None = None
    result_data: JSON | RawJSON = None
    error: str | None = None
    spec: TaskSpec = DEFAULT_SPEC
    #: A short machine-readable stage (``queued``, ``parsing``, …) set with progress.
    stage: str | None = None
    #: Children counts, a held outcome, stage changes (None: none of them).
    extra: Extra | None = None

    @property
    def children(self) -> Mapping[str, int]:
        """Counts of the direct children held, by status (docs/trees.md)."""
        return NO_CHILDREN if self.extra is None else self.extra.children

    @property
    def held(self) -> Held | None:
        """The outcome waiting for the descendants to end (never rendered)."""
        return None if self.extra is None else self.extra.held

    @property
    def stages(self) -> tuple[tuple[str, float, TaskStatus], ...]:
        """The latest stage changes: (stage, instant, status then), oldest first."""
        return () if self.extra is None else self.extra.stages

    @property
    def result(self) -> JSON:
        """The result (``completed`` only), decoded from its text if held as text."""
        data = self.result_data
        return json.loads(data) if isinstance(data, RawJSON) else data

    @property
    def metadata(self) -> Mapping[str, JSON]:
        """Caller-supplied labels (a JSON object)."""
        return self.spec.metadata

    @property
    def owner(self) -> str | None:
        """The owner the task belongs to (never rendered)."""
        return self.spec.owner

    @property
    def in_process(self) -> bool:
        """True for work run by the tracker itself (``spawn``)."""
        return self.spec.in_process

    @property
    def callback_url(self) -> str | None:
        """Where terminal records are POSTed, if anywhere."""
        return self.spec.callback_url

    @property
    def heartbeat_timeout(self) -> float | None:
        """Seconds without a report after which an external task fails."""
        return self.spec.heartbeat_timeout

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context of the task's span, if traced (docs/tracing.md)."""
        return self.spec.traceparent

    @property
    def parent_id(self) -> str | None:
        """The task this one is a child of, or None (docs/trees.md)."""
        return self.spec.parent_id

    @property
    def await_children(self) -> bool:
        """Whether ``complete`` waits for the children to end (docs/trees.md)."""
        return self.spec.await_children

    @property
    def history(self) -> tuple[tuple[TaskStatus, float], ...]:
        """The statuses this task passed through, oldest first, with the instant it
        entered each: ``pending`` at creation (tasks run elsewhere; a spawned task
        is ``running`` from its creation), ``running`` when started, the terminal
        status when finished. Bounded (at most three entries) and free: every
        instant is one of the record's own fields (docs/http-api.md). The JSON
        ``history`` adds the stage changes (``stages``)."""
        out: list[tuple[TaskStatus, float]] = []
        if not self.spec.in_process:
            out.append((TaskStatus.PENDING, self.created_at))
        if self.started_at is not None:
            out.append((TaskStatus.RUNNING, self.started_at))
        if self.finished_at is not None:
            out.append((self.status, self.finished_at))
        return tuple(out)

    @property
    def is_terminal(self) -> bool:
        """True once the task reached ``completed``, ``failed`` or ``cancelled``."""
        return self.status in TERMINAL

    @property
    def created_at_iso(self) -> str:
        """``created_at`` as RFC 3339 UTC text."""
        return iso(self.created_at)

    @property
    def updated_at_iso(self) -> str:
        """``updated_at`` as RFC 3339 UTC text."""
        return iso(self.updated_at)

    def to_json(self) -> str:
        """The public JSON object as compact text; a result held as text is spliced
        in as it is, never decoded."""
        data = self.result_data
        if not isinstance(data, RawJSON):
            return json.dumps(self.to_dict(), separators=(",", ":"))
        out = self.to_dict(result=False)
        text = json.dumps(out, separators=(",", ":"))
        # "result" comes before "error" and "metadata", and no string before it can
        # hold an unescaped quote: the first occurrence is the top-level field.
        return text.replace('"result":null', '"result":' + data.decode(), 1)

    def to_dict(self, *, result: bool = True) -> dict[str, JSON]:
        """The public JSON object of this record (owner and internals left out)."""
        values: tuple[JSON, ...] = (  # in JSON_KEYS order (test_models checks it)
            self.task_id,
            self.task_type,
            self.status.value,
            self.resource_id,
            self.created_at,
            self.updated_at,
            iso(self.created_at),
            iso(self.updated_at),
            self.started_at,
            self.finished_at,
            self.progress,
            self.message,
            self.result if result else None,
            self.error,
            dict(self.spec.metadata),
            self._history(),
            self.spec.traceparent,
            self.stage,
            self.spec.parent_id,
            dict(self.children),
        )
        return dict(zip(JSON_KEYS, values, strict=True))

    def _history(self) -> list[JSON]:
        """The JSON ``history``: statuses, and stage changes (``{status, stage, at}``)."""
        if not self.stages:
            return [{"status": status.value, "at": at} for status, at in self.history]
        entries: list[tuple[float, int, JSON]] = [
            (at, 0, {"status": status.value, "at": at}) for status, at in self.history
        ]
        entries += [
            (at, 1, {"status": status.value, "stage": stage, "at": at})
            for stage, at, status in self.stages
        ]
        entries.sort(key=_by_instant)  # at one instant, a status before its stage
        return [entry for _, _, entry in entries]

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TaskRecord:
        """Build a record from its JSON object (as the HTTP API renders it).

        Raises ``ValueError`` if a field is missing or of the wrong type.
        """
        try:
            metadata = data.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise TypeError("metadata")
            traceparent = _opt_str(data.get("traceparent"))
            parent_id = _opt_str(data.get("parent_id"))
            children = data.get("children") or {}
            if not isinstance(children, Mapping):
                raise TypeError("children")
            spec = (
                DEFAULT_SPEC
                if not metadata and traceparent is None and parent_id is None
                else TaskSpec(
                    MappingProxyType(dict(metadata)), traceparent=traceparent, parent_id=parent_id
                )
            )
            return cls(
                _str(data["task_id"]),
                _str(data["task_type"]),
                TaskStatus(_str(data["status"])),
                _opt_str(data.get("resource_id")),
                _num(data["created_at"]),
                _num(data["updated_at"]),
                _opt_num(data.get("started_at")),
                _opt_num(data.get("finished_at")),
                _opt_num(data.get("progress")),
                _opt_str(data.get("message")),
                cast(JSON, data.get("result")),
                _opt_str(data.get("error")),
                spec,
                _opt_str(data.get("stage")),
                Extra(MappingProxyType({_str(k): int(_num(v)) for k, v in children.items()}))
                if children
                else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a task record: {exc!r}") from None

    def next_extra(
        self,
        at: float,
        status: TaskStatus,
        terminal: bool,
        held: Held | None,
        stage: str | None,
    ) -> Extra | None:
        """The ``extra`` of this record's next version (a transition at ``at`` to
        ``status``): the held outcome, kept while active, dropped once terminal, and a
        stage change added to the history."""
        extra = self.extra or NO_EXTRA
        new_held = None if terminal else (extra.held if held is None else held)
        stages = extra.stages
        if stage is not None and stage != self.stage:
            stages = (*stages[1 - MAX_STAGES :], (stage, at, status))
        if new_held is extra.held and stages is extra.stages:
            return self.extra
        return extra.but(held=new_held, stages=stages)

    def evolve(
        self,
        *,
        status: TaskStatus,
        updated_at: float,
        started_at: float | None,
        finished_at: float | None,
        progress: float | None,
        message: str | None,
        result: JSON | RawJSON,
        error: str | None,
        stage: str | None,
        extra: Extra | None,
    ) -> TaskRecord:
        """A copy with the mutable-by-transition fields replaced (by hand: the actor's
        hot path, where ``dataclasses.replace`` would introspect on every call)."""
        return TaskRecord(
            self.task_id,
            self.task_type,
            status,
            self.resource_id,
            self.created_at,
            updated_at,
            started_at,
            finished_at,
            progress,
            message,
            result,
            error,
            self.spec,
            stage,
            extra,
        )


#: A result held as its compact JSON text, UTF-8 encoded (``ensure_ascii=False``),
#: valid by construction and decoded only when read. ``bytes`` because no JSON value
#: is bytes, so the type alone tells held text from a decoded value, and because a
#: bytes object is the smallest holder of text: ``{"status":"ok","count":7}`` costs
#: 61 B so, against ~215 B as a dict (docs/benchmarks.md).
RawJSON: TypeAlias = bytes


def result_from_text(text: str) -> JSON | RawJSON:
    """A stored result from its JSON text: an object or an array is kept as text,
    a scalar decoded (it is no larger decoded)."""
    if text[:1] in ("{", "["):
        return text.encode()
    decoded: JSON = json.loads(text)
    return decoded


def _by_instant(entry: tuple[float, int, JSON]) -> tuple[float, int]:
    return entry[0], entry[1]


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _opt_num(value: object) -> float | None:
    return None if value is None else _num(value)


class AnyOwner(enum.Enum):
    """Type of :data:`ANY_OWNER`, the owner filter that matches every owner."""

    ANY_OWNER = "any"


#: Pass as ``owner=`` to act on tasks whatever their owner (the in-process default).
ANY_OWNER = AnyOwner.ANY_OWNER

#: Who a call acts as: an owner string, ``None`` (unowned tasks), or ``ANY_OWNER``.
OwnerScope: TypeAlias = str | AnyOwner | None
