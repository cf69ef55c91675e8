"""``LocalEngine``: the records in this process — the pure ``TaskState`` plus a
``Store`` (``MemoryStore``: nothing kept; ``SQLiteStore``: a file).

Every handler answers at once from the state. In memory, ``commit`` publishes the
batch's changes and lets its effects out at once. With a durable store it hands them
to the ``Pipeline`` (``engine/pipeline.py``): one ``write`` (one transaction) per group
of batches, one write in flight while the actor handles the next batches, and nothing
let out before its group is on disk. A store that fails keeps the changes pending
there and refuses writes until a retry timer commits them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from .._counters import TaskCounters
from .._errors import InvalidTransition, StoreError, TaskdError
from .._models import (
    ANY_OWNER,
    JSON,
    TERMINAL,
    Held,
    OwnerScope,
    RawJSON,
    TaskRecord,
    TaskStatus,
)
from .._retention import Retention
from ..actor import messages as m
from ..actor.engine import DEFERRED, Deferred, Engine, Handler, Host, Settle
from ..actor.timers import Kind
from .codec import new_spec
from .pipeline import Pipeline
from .rules import (
    HEARTBEAT_TIMEOUT,
    NOT_ACKNOWLEDGED,
    PROGRESS_ON,
    PROGRESS_VERB,
    RUN_BY_TRACKER,
    START_FROM,
    TRACKER_RESTARTED,
    WAITING_FOR_CHILDREN,
)
from .state import Page, TaskState
from .store import Store
from .trees import Trees

if TYPE_CHECKING:
    from .._webhooks import WebhookSender
    from ..actor.runner import Runner

__all__ = ["LocalEngine"]

#: Caller commands refused while the store cannot write (they would change records).
_WRITES: Final = frozenset(
    {m.Create, m.Spawn, m.Start, m.Progress, m.Complete, m.Fail, m.Cancel, m.Delete}
    | {m.DeleteMany}
)


class LocalEngine(Engine):
    """The records in this process, behind the actor; see the module docstring."""

    def __init__(
        self,
        *,
        retention: Retention,
        store: Store,
        clock: Callable[[], float],
        cancel_grace: float,
    ) -> None:
        self.store = store
        self._persistent = store.persistent
        self.replies_after_commit = store.persistent
        self._cancel_grace = cancel_grace
        self._clock = clock
        # Event ids (SSE) start at this boot's wall-clock instant in microseconds, so
        # that they stay unique and increasing across restarts: the actor emits far
        # fewer than one change per microsecond, so a boot's ids stay below the next
        # boot's start. An id below it is from an earlier boot: no replay is possible.
        self.boot_seq = int(clock() * 1_000_000)
        self.state = TaskState(retention, first_seq=self.boot_seq)
        #: The tree rules: held outcomes, cascading cancels (docs/trees.md).
        self.trees = Trees(self.state, self._change)
        #: What /metrics and the dashboard's chart count, in this process: each
        #: transition as it is committed (with Redis, the deployment's totals instead).
        self.counters = TaskCounters()
        self._last_beat: dict[str, float] = {}
        #: Called with each terminal record that has a callback_url, after its commit.
        self._on_webhook: Callable[[TaskRecord], None] | None = None
        #: The commit to a durable store (None in memory: nothing to write).
        self._pipeline = (
            Pipeline(self, store, self.state, self._change, self._on_terminal)
            if store.persistent
            else None
        )

    def bind(self, actor: Host) -> None:
        """Called once by the actor that drives this engine."""
        super().bind(actor)
        self.trees.actor = actor

    def handlers(self) -> Mapping[type[Any], Handler]:
        """The handler of each command that touches records."""
        return {
            m.Create: self._on_create,
            m.Spawn: self._on_spawn,
            m.Start: self._on_start,
            m.Progress: self._on_progress,
            m.Complete: self._on_complete,
            m.Fail: self._on_fail,
            m.Cancel: self._on_cancel,
            m.Delete: self._on_delete,
            m.DeleteMany: self._on_delete_many,
            m.Get: self._on_get,
            m.ListTasks: self._on_list,
            m.Wait: self._on_wait,
            m.Subscribe: self._on_subscribe,
            m.Stats: self._on_stats,
            m.Committed: self._on_committed,
        }

    # --- opening ----------------------------------------------------------------------

    async def open(self, sender: WebhookSender | None) -> None:
        """Load the store's records; tasks a gone process ran are failed."""
        records = await self.store.open()
        # Ids minted from now on are told apart from other processes' (the hint).
        self.state.ids.open(self._clock())
        kept = getattr(self.store, "page_key", None)
        if isinstance(kept, bytes) and kept:
            self.page_key = kept
        if sender is not None:
            self._on_webhook = sender.submit
        self.load(records)

    def load(self, records: Iterable[TaskRecord]) -> None:
        """Rebuild state from the store before the loop starts."""
        timers = self.actor.timers
        interrupted: list[TaskRecord] = []
        for rec in self.state.load(records):
            if rec.in_process:
                interrupted.append(rec)
            elif rec.status is TaskStatus.CANCELLING:
                timers.push(rec.updated_at + self._cancel_grace, Kind.GRACE, rec.task_id)
            elif rec.heartbeat_timeout is not None:
                self._last_beat[rec.task_id] = rec.updated_at
                timers.push(rec.updated_at + rec.heartbeat_timeout, Kind.HEARTBEAT, rec.task_id)
        # The process that ran these coroutines is gone: nobody will finish them.
        for rec in interrupted:
            self._change(rec, TaskStatus.FAILED, error=TRACKER_RESTARTED)
        for kind, task_id, _ in timers.pop_due(self.actor.now):
            self.fire(kind, task_id)
        self.fired()

    # --- the commit -------------------------------------------------------------------

    def refuses(self, msg: object, fut: asyncio.Future[Any] | None) -> bool:
        """While the store cannot write, caller commands that would change a record
        are refused up front (503); reads go on."""
        if not self._persistent or fut is None or type(msg) not in _WRITES:
            return False
        fut.set_exception(StoreError(f"the store cannot write: {self.store_error}"))
        return True

    async def commit(self) -> bool:
        """In memory: publish the batch's changes, and let its effects out (True).
        With a durable store the pipeline writes them, and lets the effects out itself
        once they are on disk (False)."""
        pipeline = self._pipeline
        if pipeline is not None:
            await pipeline.commit()
            return False
        a = self.actor
        dirty, changed = self.state.take_changes()
        a.send_replies()
        if changed:
            a.hub.publish(changed, self._on_terminal)
        if None in dirty.values():  # removed tasks: out of the replay ring too
            a.hub.forget([i for i, r in dirty.items() if r is None])
        return True

    def _on_committed(self, msg: m.Committed, fut: object) -> None:
        if self._pipeline is not None:
            self._pipeline.committed(msg)

    def _on_terminal(self, rec: TaskRecord) -> None:
        """A terminal record was committed: wake its waiters, send its webhook, end
        its span."""
        if rec.spec.callback_url is not None and self._on_webhook is not None:
            self._on_webhook(rec)
        tracing = self.actor.tracing
        if tracing is not None:
            tracing.ended(rec)
        self.actor.wake_waiters(rec)

    def shut(self) -> None:
        """Hand the actor the callers of what is not committed; say what the store
        never took (its callers got 503)."""
        if self._pipeline is not None:
            self._pipeline.shut()

    async def stop(self) -> None:
        """Leave no write behind."""
        if self._pipeline is not None:
            await self._pipeline.stop()

    # --- timers -----------------------------------------------------------------------

    def fire(self, kind: Kind, task_id: str) -> None:
        """A heartbeat, cancel grace or store retry came due."""
        a = self.actor
        now = a.now
        if kind is Kind.RETRY:
            if self._pipeline is not None:
                self._pipeline.retry_due = True  # this batch's commit tries again
            return
        rec = self.state.get(task_id)
        if rec is None or rec.status in TERMINAL:
            return
        if rec.held is not None:
            return  # its own work has ended: it waits for its descendants only
        if kind is Kind.HEARTBEAT:
            last = self._last_beat.get(task_id)
            if last is None or rec.heartbeat_timeout is None:
                return
            if last + rec.heartbeat_timeout <= now:
                self._change(rec, TaskStatus.FAILED, error=HEARTBEAT_TIMEOUT)
            else:
                a.timers.push(last + rec.heartbeat_timeout, Kind.HEARTBEAT, task_id)
        elif kind is Kind.GRACE:
            if rec.status is not TaskStatus.CANCELLING:
                return
            if rec.updated_at + self._cancel_grace > now:  # it reported since
                a.timers.push(rec.updated_at + self._cancel_grace, Kind.GRACE, task_id)
                return
            runner = a.runners.get(task_id)
            if runner is not None:
                runner.settle_with = (TaskStatus.CANCELLED, None, None)
            self.trees.finish(rec, TaskStatus.CANCELLED, error=NOT_ACKNOWLEDGED)

    def fired(self) -> None:
        """Expire records past their TTL; the next expiry is the timers' floor."""
        self.state.expire(self.actor.now)
        self.actor.timers.reset_due(self.state.next_expiry())

    def latest(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        """A wait ran out (or a long-poll was released): the latest record."""
        self.actor.replies.append((fut, None, (self.state.get(task_id), False)))

    def timed_out(self, task_id: str) -> None:
        """The runner was cancelled for its timeout: cancelling until it unwinds."""
        rec = self.state.get(task_id)
        if rec is not None and rec.status is TaskStatus.RUNNING:
            self._change(rec, TaskStatus.CANCELLING)

    # --- changing records -------------------------------------------------------------

    def _change(
        self,
        rec: TaskRecord,
        status: TaskStatus,
        *,
        progress: float | None = None,
        message: str | None = None,
        result: JSON | RawJSON = None,
        error: str | None = None,
        action: str | None = None,
        stage: str | None = None,
        held: Held | None = None,
    ) -> TaskRecord:
        """Move ``rec`` to ``status`` (the state checks the transition table), then
        arrange what the actor owns: deadlines, heartbeats, the runner's outcome."""
        a = self.actor
        state = self.state
        new = state.transition(
            rec,
            status,
            a.now,
            progress=progress,
            message=message,
            result=result,
            error=error,
            action=action,
            stage=stage,
            held=held,
        )
        if rec.status is not new.status:
            tid = new.task_id
            if new.status in TERMINAL:
                self.counters.on_finished(new)
                self._last_beat.pop(tid, None)
                expires = self.state.expires_at(new)
                if expires < a.timers.due:
                    a.timers.due = expires
                runner = a.runners.get(tid)
                if runner is not None:
                    # With the terminal record: the handle shows it once settled.
                    a.settle.append((runner, new))
            elif new.status is TaskStatus.CANCELLING:
                a.timers.push(a.now + self._cancel_grace, Kind.GRACE, tid)
            elif new.status is TaskStatus.RUNNING:
                self.counters.on_started(new)
        if state.freed and not self.trees.cascading:
            self.trees.free()
        return new

    def end(
        self,
        runner: Runner,
        status: TaskStatus,
        *,
        result: JSON | RawJSON = None,
        error: str | None = None,
        settle: Settle,
    ) -> None:
        """Record how a runner ended; its handle settles after the commit."""
        runners = self.actor.runners
        rec = self.state.get(runner.task_id)
        try:
            if rec is None or rec.status in TERMINAL:
                return  # already recorded (cancelled while pending, or abandoned)
            runner.settle_with = settle
            new = self.trees.finish(rec, status, result=result, error=error)
            if new.status not in TERMINAL:
                # Held for its descendants: the handle says how the coroutine ended.
                self.actor.settle.append((runner, new))
        finally:
            runners.pop(runner.task_id, None)

    # --- handlers ---------------------------------------------------------------------

    def _on_create(self, msg: m.Create, fut: object) -> TaskRecord:
        spec = new_spec(
            msg.metadata,
            msg.owner,
            False,
            msg.callback_url,
            msg.heartbeat_timeout,
            msg.traceparent,
            msg.parent_id,
            msg.await_children,
        )

        def build(task_id: str, at: float) -> TaskRecord:
            return TaskRecord(
                task_id, msg.task_type, TaskStatus.PENDING, msg.resource_id, at, at, spec=spec
            )

        a = self.actor
        rec = self.state.insert(
            msg.task_type, msg.resource_id, msg.owner, a.now, build, msg.parent_id
        )
        if msg.span is not None and a.tracing is not None:
            a.tracing.opened(msg.span, rec.task_id)
        if msg.heartbeat_timeout is not None:
            self._last_beat[rec.task_id] = rec.created_at
            a.timers.push(rec.created_at + msg.heartbeat_timeout, Kind.HEARTBEAT, rec.task_id)
        return rec

    def _on_spawn(self, msg: m.Spawn, fut: object) -> TaskRecord:
        if msg.minted is not None:
            return self._spawn_minted(msg, msg.minted)
        spec = new_spec(
            msg.metadata, msg.owner, True, msg.callback_url, None, msg.traceparent, msg.parent_id
        )

        def build(task_id: str, at: float) -> TaskRecord:
            # Running from the start: the runner is launched right after this batch
            # commits and begins on the next loop iteration, so a pending state would
            # be visible to nobody; skipping it saves a record version.
            return TaskRecord(
                task_id, msg.task_type, TaskStatus.RUNNING, msg.resource_id, at, at, at, spec=spec
            )

        rec = self.state.insert(
            msg.task_type, msg.resource_id, msg.owner, self.actor.now, build, msg.parent_id
        )
        self.counters.on_spawned(rec.task_type)  # running from its creation
        return self.actor.add_runner(msg, rec)

    def _spawn_minted(self, msg: m.Spawn, rec: TaskRecord) -> TaskRecord:
        try:
            self.state.insert_minted(rec)
        except TaskdError as exc:
            # admits() said there was room; if that ever fails to hold, the handle the
            # caller already has gets the refusal and the coroutine never runs.
            msg.coro.close()
            msg.done.set(TaskStatus.FAILED, None, exc)
            raise
        self.counters.on_spawned(rec.task_type)
        return self.actor.add_runner(msg, rec)

    def admits(self) -> bool:
        """Nothing to commit first (no persistent store), no per-owner quota, and room
        under the cap even if every message still in the mailbox inserts a task.
        Read between the actor's batches (one thread): the counts are the committed
        state."""
        state = self.state
        return (
            not self._persistent
            and state.quota is None
            and state.active + self.actor.mailbox.qsize() < state.cap
        )

    def settled(self) -> bool:
        """Only when the answer cannot differ from the actor's: no persistent store (a
        batch never suspends half-committed), an empty mailbox (every command sent
        before, fire-and-forget ones included, has been applied), and no timer due
        (the actor would expire records first)."""
        a = self.actor
        return not (self._persistent or not a.mailbox.empty() or self._clock() >= a.timers.due)

    def read(self, task_id: str, owner: OwnerScope) -> TaskRecord | None:
        """The record, if ``owner`` may see it."""
        rec = self.state.get(task_id)
        if rec is None or (owner is not ANY_OWNER and rec.owner != owner):
            return None
        return rec

    def peek(self, task_id: str, owner: OwnerScope) -> TaskRecord | Deferred | None:
        """``settled`` and ``read`` folded into one call: the hottest HTTP route
        (every poll) takes this path."""
        a = self.actor
        if self._persistent or not a.mailbox.empty() or self._clock() >= a.timers.due:
            return DEFERRED
        rec = self.state.get(task_id)
        if rec is None or (owner is not ANY_OWNER and rec.spec.owner != owner):
            return None
        return rec

    def mint(self, now: float) -> tuple[str, float]:
        """A new task id, from the state's one sequence (``TaskState.mint``, a call
        less: the spawn fast path mints one per task)."""
        return self.state.ids.mint(now)

    def hint(self, task_id: str) -> str | None:
        """Why an id minted by another process since this one opened is not here
        (``engine/ids.py``): the records are this process's alone."""
        return self.state.ids.hint(task_id)

    def _beat(self, task_id: str) -> None:
        if task_id in self._last_beat:
            self._last_beat[task_id] = self.actor.now

    def _external(self, msg: m.Start | m.Complete | m.Fail, action: str) -> TaskRecord:
        rec = self.state.visible(msg.task_id, msg.owner)
        if rec.in_process and rec.status not in TERMINAL:
            # Its runner reports how it ends; a second source of truth would race it.
            raise InvalidTransition(rec.task_id, RUN_BY_TRACKER, action)
        if rec.held is not None:
            raise InvalidTransition(rec.task_id, WAITING_FOR_CHILDREN, action)
        return rec

    def _on_start(self, msg: m.Start, fut: object) -> TaskRecord:
        rec = self._external(msg, "start")
        if rec.status not in START_FROM:
            raise InvalidTransition(rec.task_id, rec.status.value, "start")
        self._beat(rec.task_id)
        return self._change(rec, TaskStatus.RUNNING, action="start")

    def _on_progress(self, msg: m.Progress, fut: object) -> TaskRecord:
        rec = self.state.visible(msg.task_id, msg.owner)
        if rec.status not in PROGRESS_ON:
            raise InvalidTransition(rec.task_id, rec.status.value, PROGRESS_VERB)
        self._beat(rec.task_id)
        return self._change(
            rec, rec.status, progress=msg.progress, message=msg.message, stage=msg.stage
        )

    def _on_complete(self, msg: m.Complete, fut: object) -> TaskRecord:
        rec = self._external(msg, "complete")
        return self.trees.finish(rec, TaskStatus.COMPLETED, result=msg.result, action="complete")

    def _on_fail(self, msg: m.Fail, fut: object) -> TaskRecord:
        rec = self._external(msg, "fail")
        return self._change(rec, TaskStatus.FAILED, error=msg.error, action="fail")

    def _on_cancel(self, msg: m.Cancel, fut: object) -> tuple[TaskRecord, bool]:
        rec = self.state.visible(msg.task_id, msg.owner)
        return self.trees.cancel(rec, msg.reason, confirm=msg.confirm)

    def _on_delete(self, msg: m.Delete, fut: object) -> None:
        self.state.delete(msg.task_id, msg.owner)

    def _on_delete_many(self, msg: m.DeleteMany, fut: object) -> tuple[int, str | None]:
        page = self._on_list(msg.listing(), fut)
        state = self.state
        deleted = 0
        for rec in page.records:
            # (a subtree deleted with its parent, or one still working, is skipped)
            if state.get(rec.task_id) is not None and not state.forest.live(rec.task_id):
                deleted += state.delete(rec.task_id, msg.owner)
        return deleted, page.next_cursor

    def _on_get(self, msg: m.Get, fut: object) -> TaskRecord | None:
        return self.read(msg.task_id, msg.owner)

    def _on_list(self, msg: m.ListTasks, fut: object) -> Page:
        return self.state.list_page(
            statuses=msg.statuses,
            task_type=msg.task_type,
            resource_id=msg.resource_id,
            owner=msg.owner,
            limit=msg.limit,
            before=msg.before,
            stage=msg.stage,
            parent_id=msg.parent_id,
        )

    def _on_wait(self, msg: m.Wait, fut: asyncio.Future[Any] | None) -> object:
        return self.actor.wait_on(msg, fut, self.state.visible(msg.task_id, msg.owner))

    def _on_subscribe(self, msg: m.Subscribe, fut: object) -> TaskRecord | None:
        sub = msg.subscription
        state = self.state
        rec = None if sub.task_id is None else state.visible(sub.task_id, sub.owner)
        pipeline = self._pipeline
        pending = state.pending_changes if pipeline is None else pipeline.uncommitted()
        self.actor.hub.subscribe(sub, rec, state.seq, pending)
        return rec

    def _on_stats(self, msg: m.Stats, fut: object) -> object:
        state = self.state
        finished = self.counters.snapshot(self.actor.now)
        return self.actor.stats(state.counts(), len(state), state.active, finished)
