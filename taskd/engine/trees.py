"""``Trees``: the tree rules of the local engine (docs/trees.md).

A task's own work may end before its descendants': a cancel (the parent is
``cancelling`` until every descendant is terminal, then ``cancelled``) and the
``complete`` of a task created with ``await_children`` (``running`` until then, then
``completed`` with that result) are *held*: the record keeps the outcome (``held``)
and the state frees it once its last active descendant ends (``TaskState.freed``).
A cancel cascades to every active descendant, deepest first, each cancelled as a
direct cancel would (a spawned one's coroutine is cancelled, an external one's worker
learns it as it learns any cancel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .._errors import InvalidTransition
from .._models import (
    ACTIVE,
    JSON,
    TERMINAL,
    TRANSITIONS,
    Held,
    RawJSON,
    TaskRecord,
    TaskStatus,
)
from .forest import finished_share
from .rules import CANCEL_EXTERNAL, CANCEL_SPAWNED, CONFIRM_EXTERNAL

if TYPE_CHECKING:
    from ..actor.engine import Host
    from .state import TaskState

__all__ = ["Change", "Trees"]


class Change(Protocol):
    """The engine's one way to move a record (``LocalEngine._change``)."""

    def __call__(
        self,
        rec: TaskRecord,
        status: TaskStatus,
        *,
        result: JSON | RawJSON = None,
        error: str | None = None,
        action: str | None = None,
        held: Held | None = None,
        progress: float | None = None,
    ) -> TaskRecord:
        """Move ``rec`` to ``status`` (the same status: hold an outcome)."""
        ...


class Trees:
    """Held outcomes and cascading cancels; see the module docstring."""

    actor: Host

    def __init__(self, state: TaskState, change: Change) -> None:
        self._state = state
        self._change = change
        #: Set while a cancel cascades: what it frees is applied once it is done
        #: (a parent freed mid-cascade would apply an outcome the cancel replaces).
        self.cascading = 0

    def finish(
        self,
        rec: TaskRecord,
        status: TaskStatus,
        *,
        result: JSON | RawJSON = None,
        error: str | None = None,
        action: str | None = None,
    ) -> TaskRecord:
        """End ``rec``'s own work with ``status``: now, or held (``cancelling``, or its
        status for an awaited ``complete``) while a descendant is active."""
        if (
            status is TaskStatus.CANCELLED
            or (status is TaskStatus.COMPLETED and rec.spec.await_children)
        ) and self._state.forest.live(rec.task_id):
            if status not in TRANSITIONS[rec.status]:  # (a pending task cannot complete)
                raise InvalidTransition(rec.task_id, rec.status.value, action or status.value)
            held = Held(status, result, error)
            if status is TaskStatus.CANCELLED:
                return self._change(rec, TaskStatus.CANCELLING, held=held, action=action)
            # (awaiting its children: its progress is the share of them finished)
            progress = finished_share(rec.children)
            return self._change(rec, rec.status, held=held, action=action, progress=progress)
        return self._change(rec, status, result=result, error=error, action=action)

    def free(self) -> None:
        """Apply what waited for a task's last active descendant: its held outcome,
        or the removal its TTL asked for."""
        state = self._state
        while state.freed:
            tid = state.freed.pop()
            rec = state.get(tid)
            if rec is None:
                continue
            held = rec.held
            if held is not None and rec.status not in TERMINAL:
                self._change(rec, held.status, result=held.result, error=held.error)
            elif tid in state.kept:
                state.remove(tid)

    def cancel(self, rec: TaskRecord, reason: str, *, confirm: bool) -> tuple[TaskRecord, bool]:
        """Cancel ``rec`` and its active descendants; the record, and whether the
        cancel changed it (a cancel asked before, or done, changes nothing)."""
        self.cascading += 1
        try:
            out = self._cancel_one(rec, reason, confirm)
        finally:
            self.cascading -= 1
        if not self.cascading and self._state.freed:
            self.free()
            out = (self._state.get(rec.task_id) or out[0], out[1])
        return out

    def _cancel_one(self, rec: TaskRecord, reason: str, confirm: bool) -> tuple[TaskRecord, bool]:
        a = self.actor
        state = self._state
        tid = rec.task_id
        runner = a.runners.get(tid)
        if runner is not None and runner.task is None and rec.status not in TERMINAL:
            # Spawned in this same batch, or in one still being committed, and not
            # launched yet: it never starts.
            self._cascade(tid, reason)
            runner.settle_with = (TaskStatus.CANCELLED, None, None)
            # (with its runner still booked: the record's commit settles its handle)
            new = self.finish(state.get(tid) or rec, TaskStatus.CANCELLED, error=reason)
            if runner in a.launch:
                a.launch.remove(runner)
            # (else its group's commit skips it: it is closed)
            runner.close()
            del a.runners[tid]
            if new.status not in TERMINAL:  # held for descendants: settle it now
                a.settle.append((runner, new))
            return new, True
        table = CANCEL_EXTERNAL if not confirm or rec.in_process else CONFIRM_EXTERNAL
        to = (CANCEL_SPAWNED if runner is not None else table).get(rec.status)
        if to is None:
            raise InvalidTransition(tid, rec.status.value, "cancel")
        if runner is not None and runner.task is not None:
            # Spawned and running: cancelling until the coroutine has unwound.
            runner.task.cancel()
        if to is rec.status:
            return rec, False  # asked before, or done: idempotent
        self._cascade(tid, reason)
        rec = state.get(tid) or rec
        # An external task whose descendants are still active after the cascade: its
        # work is theirs, so it is cancelled once they have settled, not when its own
        # worker confirms (docs/trees.md).
        waits = runner is None and state.forest.live(tid) > 0
        if to is TaskStatus.CANCELLED or rec.held is not None or waits:
            # (a held task's own work has ended: there is no one left to ask)
            return self.finish(rec, TaskStatus.CANCELLED, error=reason), True
        return self._change(rec, to, action="cancel"), True

    def _cascade(self, task_id: str, reason: str) -> None:
        """Cancel the active descendants of ``task_id`` (each with its subtree)."""
        state = self._state
        children = state.forest.children(task_id)
        if not children or not state.forest.live(task_id):
            return
        for tid in list(children):
            child = state.get(tid)
            if child is None:
                continue
            if child.status in ACTIVE:
                self._cancel_one(child, reason, False)
            else:  # (finished, with active descendants of its own: they are reached)
                self._cascade(tid, reason)
