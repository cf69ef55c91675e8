"""The command rules every engine applies, written once.

The local engine reads them here; the Redis script reads them as Lua tables generated
from this module (``lua_tables``, substituted for ``@RULES@`` in ``script.lua``), so a
rule, a field name or an error text changed here changes every engine at once, and
``tests/test_transitions.py`` (run on memory, SQLite and Redis) checks them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .._models import ACTIVE, MAX_STAGES, TERMINAL, TRANSITIONS, TaskStatus

__all__ = [
    "ACTIVE_DESCENDANTS",
    "ADD_CHILD_VERB",
    "CANCEL_EXTERNAL",
    "CANCEL_SPAWNED",
    "CONFIRM_EXTERNAL",
    "DELETE_FROM",
    "HEARTBEAT_TIMEOUT",
    "NOT_ACKNOWLEDGED",
    "PROCESS_LOST",
    "PROGRESS_ON",
    "PROGRESS_VERB",
    "RUN_BY_TRACKER",
    "START_FROM",
    "TRACKER_RESTARTED",
    "WAITING_FOR_CHILDREN",
    "lua_tables",
]

S = TaskStatus

#: ``start``: only a pending task starts (a running one is not started twice).
START_FROM: Final = frozenset({S.PENDING})
#: ``progress``: reported while a task is active (cancelling included: that is how a
#: worker learns it was asked to stop).
PROGRESS_ON: Final = ACTIVE
#: ``delete``: only a finished task is deleted.
DELETE_FROM: Final = TERMINAL
#: ``cancel`` of an external task: pending stops at once, running is asked, and a
#: second cancel of a cancelling one is the worker confirming.
CANCEL_EXTERNAL: Final[Mapping[TaskStatus, TaskStatus]] = MappingProxyType(
    {S.PENDING: S.CANCELLED, S.RUNNING: S.CANCELLING}
    # idempotent: a cancel already asked for, or done, changes nothing
    | {S.CANCELLING: S.CANCELLING, S.CANCELLED: S.CANCELLED}
)
#: ``cancel(confirm=True)``: the worker of an external task acknowledges (or stops
#: on its own): cancelled; a confirm already recorded changes nothing.
CONFIRM_EXTERNAL: Final[Mapping[TaskStatus, TaskStatus]] = MappingProxyType(
    {S.PENDING: S.CANCELLED, S.RUNNING: S.CANCELLED, S.CANCELLING: S.CANCELLED}
    | {S.CANCELLED: S.CANCELLED}
)
#: ``cancel`` of a spawned task: cancelling until its coroutine has unwound (its
#: runner records cancelled); cancelling again changes nothing.
CANCEL_SPAWNED: Final[Mapping[TaskStatus, TaskStatus]] = MappingProxyType(
    {S.RUNNING: S.CANCELLING, S.CANCELLING: S.CANCELLING, S.CANCELLED: S.CANCELLED}
)

# --- the texts the rules write into records and refusals --------------------------

#: Why ``start``/``complete``/``fail`` of a spawned task is refused (its runner is
#: the one source of truth for how it ends).
RUN_BY_TRACKER: Final = "run by the tracker itself"
#: The action named when progress is refused.
PROGRESS_VERB: Final = "report progress on"
#: The error of a cancelling task whose worker did not confirm within cancel_grace.
NOT_ACKNOWLEDGED: Final = "cancel not acknowledged"
#: The error of an active task that missed its heartbeat.
HEARTBEAT_TIMEOUT: Final = "heartbeat timeout"
#: The error of a spawned task whose process is gone (Redis: its liveness lapsed).
PROCESS_LOST: Final = "interrupted: process lost"
#: Why a delete of a finished task is refused while its subtree is not (docs/trees.md).
ACTIVE_DESCENDANTS: Final = "a parent of active tasks"
#: The action named when a new child is refused (its parent is finished or cancelling).
ADD_CHILD_VERB: Final = "add a child to"
#: Why ``start``/``complete``/``fail`` is refused once a task's own work has ended and
#: its outcome waits for its descendants.
WAITING_FOR_CHILDREN: Final = "waiting for its children"
#: The error of a spawned task found active when a durable store is loaded again.
TRACKER_RESTARTED: Final = "interrupted: tracker restarted"


def _set(statuses: frozenset[TaskStatus]) -> str:
    return "{" + ", ".join(f"{s.value} = true" for s in sorted(statuses)) + "}"


def _map(moves: Mapping[TaskStatus, TaskStatus]) -> str:
    return "{" + ", ".join(f"{a.value} = '{b.value}'" for a, b in sorted(moves.items())) + "}"


def _text(value: str) -> str:
    assert "'" not in value and "\\" not in value
    return f"'{value}'"


def lua_tables(fields: tuple[str, ...], payload: tuple[str, ...]) -> str:
    """The rules as Lua ``local`` tables, for the Redis script (``@RULES@``);
    ``fields`` and ``payload`` are the codec's Redis hash fields."""
    trans = ", ".join(f"{src.value} = {_set(dsts)}" for src, dsts in TRANSITIONS.items())
    texts = {
        "run_by_tracker": RUN_BY_TRACKER,
        "progress_verb": PROGRESS_VERB,
        "not_acknowledged": NOT_ACKNOWLEDGED,
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "process_lost": PROCESS_LOST,
        "active_descendants": ACTIVE_DESCENDANTS,
        "add_child_verb": ADD_CHILD_VERB,
        "waiting_for_children": WAITING_FOR_CHILDREN,
    }
    lines = [
        "-- generated from taskd.engine.rules and taskd.engine.codec: do not edit here",
        f"local TRANS = {{{trans}}}",
        f"local TERMINAL = {_set(TERMINAL)}",
        f"local ACTIVE = {_set(ACTIVE)}",
        f"local START_FROM = {_set(START_FROM)}",
        f"local PROGRESS_ON = {_set(PROGRESS_ON)}",
        f"local DELETE_FROM = {_set(DELETE_FROM)}",
        f"local CANCEL_EXTERNAL = {_map(CANCEL_EXTERNAL)}",
        f"local CANCEL_SPAWNED = {_map(CANCEL_SPAWNED)}",
        f"local CONFIRM_EXTERNAL = {_map(CONFIRM_EXTERNAL)}",
        f"local MAX_STAGES = {MAX_STAGES}",
        "local TEXT = {" + ", ".join(f"{k} = {_text(v)}" for k, v in texts.items()) + "}",
        "local FIELDS = {" + ", ".join(_text(f) for f in fields) + "}",
        "local PAYLOAD = {" + ", ".join(_text(f) for f in payload) + "}",
    ]
    return "\n".join(lines)
