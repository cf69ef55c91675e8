"""The actor: the one asyncio task that owns every record.

Everything here runs inside that task, so no lock guards any of it. The loop takes a
batch of messages from the mailbox, fires due timers, handles each message (a handler
that raises answers its own caller; the loop goes on), writes the batch's changes to
the store in one call (group commit), and only then answers callers, wakes waiters,
feeds subscriptions and starts runners. If the loop itself dies, ``_shut`` fails every
pending reply with ``TrackerClosed`` so that nothing hangs.

What it owns is split by concern: ``TaskState`` (``_state``) holds the records, their
indexes and the transition rules, with no asyncio; ``Timers`` (``_timers``) the
deadlines; ``Hub`` (``_hub``) the subscriptions and the replay ring. The actor keeps
the loop, dispatch, the commit, waiters and the runners of spawned coroutines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from .._counters import TaskCounters
from .._errors import InvalidTransition, StoreError, TaskdError, TrackerClosed
from .._models import (
    ACTIVE,
    ANY_OWNER,
    JSON,
    TERMINAL,
    OwnerScope,
    RawJSON,
    TaskRecord,
    TaskStatus,
)
from .._retention import Retention
from ..engine.state import TaskState, new_spec
from ..engine.store import Store
from . import messages as m
from .hub import Hub
from .runner import Runner
from .timers import Kind, Timers

if TYPE_CHECKING:
    from ..tracker import TrackerStats

__all__ = ["Actor", "MailboxItem"]

log = logging.getLogger("taskd")

MAX_BATCH: Final = 512
#: The error of a cancelling task whose worker did not confirm within cancel_grace.
NOT_ACKNOWLEDGED: Final = "cancel not acknowledged"
#: Seconds between attempts to write to a store that failed.
STORE_RETRY: Final = 0.5
#: Caller commands refused while the store cannot write (they would change records).
_WRITES: Final = frozenset(
    {m.Create, m.Spawn, m.Start, m.Progress, m.Complete, m.Fail, m.Cancel, m.Delete}
)

#: A mailbox item: a message and the future its reply goes to (None: no reply).
#: The future's type is the message's ``Request[R]``; the mailbox holds all kinds.
MailboxItem = tuple[object, "asyncio.Future[Any] | None"]
# A reply waiting for the batch's commit: (future, exception or None, value).
_Reply = tuple["asyncio.Future[Any]", "BaseException | None", object]


class _Deferred:
    """Returned by a handler that answers later (``Wait``)."""


_DEFERRED: Final = _Deferred()
_TICK: Final = m.Tick()


class Actor:
    """Owner of all task state. Only ``run`` and what it calls touch the fields."""

    def __init__(
        self,
        *,
        mailbox: asyncio.Queue[MailboxItem],
        retention: Retention,
        store: Store,
        clock: Callable[[], float],
        cancel_grace: float = 60.0,
    ) -> None:
        self._mailbox = mailbox
        self._store = store
        self._persistent = store.persistent
        self._clock = clock
        self._cancel_grace = cancel_grace
        self.closed = False
        self.commands = 0
        #: What /metrics and the dashboard's chart count (transitions, as committed).
        self.counters = TaskCounters()
        #: Called with each terminal record that has a callback_url, after its commit.
        self.on_terminal: Callable[[TaskRecord], None] | None = None
        #: Why the store cannot write (None while it can); /health reports it.
        self.store_error: str | None = None
        self._retry_due = False

        # Event ids (SSE) start at this boot's wall-clock instant in microseconds, so
        # that they stay unique and increasing across restarts: the actor emits far
        # fewer than one change per microsecond, so a boot's ids stay below the next
        # boot's start. An id below it is from an earlier boot: no replay is possible.
        self.boot_seq = int(clock() * 1_000_000)
        self._state = TaskState(retention, first_seq=self.boot_seq)
        self._hub = Hub(self.boot_seq)
        self._timers = Timers(clock, self._wake)
        self._now = 0.0
        self._last_beat: dict[str, float] = {}
        self._runners: dict[str, Runner] = {}
        self._waiters: dict[str, set[asyncio.Future[Any]]] = {}
        # The waiters that are long-polls (answered early at shutdown), and whether
        # that has happened (later polls are then answered at once).
        self._polls: set[asyncio.Future[Any]] = set()
        self._polls_released = False
        self._draining = False
        self._stopping = False

        # Per-batch effects, applied after the commit.
        self._replies: list[_Reply] = []
        self._launch: list[Runner] = []
        self._settle: list[tuple[Runner, TaskRecord]] = []
        # Changes taken from the state but not committed yet (the store failed).
        self._unwritten: tuple[dict[str, TaskRecord | None], list[tuple[int, TaskRecord]]] = (
            {},
            [],
        )

        # One handler per message class; each takes its own message class (Any here:
        # a registry cannot say "the key's type", the handlers' signatures do).
        self._handlers: dict[type[Any], Callable[[Any], object]] = {
            m.Create: self._on_create,
            m.Spawn: self._on_spawn,
            m.Start: self._on_start,
            m.Progress: self._on_progress,
            m.Complete: self._on_complete,
            m.Fail: self._on_fail,
            m.Cancel: self._on_cancel,
            m.Delete: self._on_delete,
            m.Get: self._on_get,
            m.ListTasks: self._state.list_page,
            m.Unwait: self._on_unwait,
            m.Subscribe: self._on_subscribe,
            m.Unsubscribe: self._on_unsubscribe,
            m.Stats: self._on_stats,
            m.RunnerFinished: self._on_runner_finished,
            m.ReleasePolls: self._on_release_polls,
            m.Drain: self._on_drain,
            m.Abandon: self._on_abandon,
            m.Stop: self._on_stop,
            m.Tick: self._on_tick,
        }

    # --- loading --------------------------------------------------------------------

    def load(self, records: Iterable[TaskRecord]) -> None:
        """Rebuild state from the store before the loop starts."""
        self._tick()
        interrupted: list[TaskRecord] = []
        for rec in self._state.load(records):
            if rec.in_process:
                interrupted.append(rec)
            elif rec.status is TaskStatus.CANCELLING:
                self._timers.push(rec.updated_at + self._cancel_grace, Kind.GRACE, rec.task_id)
            elif rec.heartbeat_timeout is not None:
                self._last_beat[rec.task_id] = rec.updated_at
                self._timers.push(
                    rec.updated_at + rec.heartbeat_timeout, Kind.HEARTBEAT, rec.task_id
                )
        # The process that ran these coroutines is gone: nobody will finish them.
        for rec in interrupted:
            self._change(rec, TaskStatus.FAILED, error="interrupted: tracker restarted")
        self._fire_timers()

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """The mailbox loop. Returns after ``Stop``; on any exit fails what is pending."""
        queue = self._mailbox
        timers = self._timers
        try:
            await self._flush()  # what load() changed (interrupted tasks, purges)
            while not self._stopping:
                first = queue.get_nowait() if not queue.empty() else await queue.get()
                batch = [first]
                while len(batch) < MAX_BATCH and not queue.empty():
                    batch.append(queue.get_nowait())
                if self._tick() >= timers.due:
                    self._fire_timers()
                for msg, fut in batch:
                    self._dispatch(msg, fut)
                self.commands += len(batch)
                await self._flush()
                timers.arm()
        finally:
            timers.cancel()
            self._shut()

    def _dispatch(self, msg: object, fut: asyncio.Future[Any] | None) -> None:
        refuse = self.store_error is not None and self._persistent
        if refuse and fut is not None and type(msg) in _WRITES:
            fut.set_exception(StoreError(f"the store cannot write: {self.store_error}"))
            return
        try:
            value: object
            if type(msg) is m.Wait:  # answers later, on the future it is given
                value = self._on_wait(msg, fut)
            else:
                value = self._handlers[type(msg)](msg)
        except (TaskdError, ValueError, TypeError) as exc:
            if fut is not None:
                self._replies.append((fut, exc, None))
            else:
                log.debug("dropped %s: %s", type(msg).__name__, exc)
        except Exception as exc:
            # A bug in one handler must not take the tracker down: answer and go on.
            log.exception("handler for %s raised", type(msg).__name__)
            if fut is not None:
                self._replies.append((fut, exc, None))
        else:
            if fut is not None and value is not _DEFERRED:
                if self._persistent:
                    self._replies.append((fut, None, value))
                elif not fut.done():
                    # Nothing to commit first: answer now, skip the reply list.
                    fut.set_result(value)

    async def _flush(self) -> None:
        """Commit the batch, then let its effects out (group commit)."""
        dirty, changed = self._state.take_changes()
        if self._unwritten[0] or self._unwritten[1]:
            old_dirty, old_changed = self._unwritten
            old_dirty.update(dirty)
            dirty, changed = old_dirty, old_changed + changed
            self._unwritten = ({}, [])
        if dirty and self._persistent:
            if self.store_error is not None and not self._retry_due:
                self._unwritten = (dirty, changed)  # wait for the retry timer
                changed = []
            else:
                self._retry_due = False
                upserts = [r for r in dirty.values() if r is not None]
                deletes = [i for i, r in dirty.items() if r is None]
                try:
                    await self._store.write(upserts, deletes)
                except Exception as exc:
                    first = self.store_error is None
                    self._unwritten = (dirty, changed)
                    self._write_failed(exc, refuse=first)
                    if first:
                        return
                    changed = []
                else:
                    if self.store_error is not None:
                        log.warning("the store writes again: %d change(s) committed", len(upserts))
                        self.store_error = None
        self._send_replies()
        if self.store_error is not None:
            return  # what changed is not committed yet: nobody hears of it until it is
        if changed:
            self._hub.publish(changed, self._on_terminal)
        if None in dirty.values():  # removed tasks: out of the replay ring too
            self._hub.forget([i for i, r in dirty.items() if r is None])
        self._after_commit()

    def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        for fut, error, value in replies:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)

    def _after_commit(self) -> None:
        """Settle the outcomes of runners whose record is terminal, start new ones."""
        if self._settle:
            settle, self._settle = self._settle, []
            for runner, rec in settle:
                if runner.settle_with is not None:
                    runner.outcome.set(*runner.settle_with, rec)
        if self._launch:
            self._start_runners()

    def _start_runners(self) -> None:
        launch, self._launch = self._launch, []
        for runner in launch:
            runner.start()

    def _write_failed(self, exc: Exception, *, refuse: bool) -> None:
        """The store could not commit. The first failing batch's callers get
        ``StoreError`` (503): nothing is acknowledged that is not on disk. The changes
        stay in memory and pending (``_unwritten``), as do their notifications, and
        are written by a later attempt; until then caller commands that would change a
        record are refused up front (reads go on), and a timer retries the write."""
        reason = f"{type(exc).__name__}: {exc}"
        if self.store_error is None:
            log.error("the store cannot write; refusing changes until it can: %s", reason)
        self.store_error = reason
        self._timers.push(self._now + STORE_RETRY, Kind.RETRY, "")
        if not refuse:
            return
        failed = StoreError(f"the store cannot write: {reason}")
        replies, self._replies = self._replies, []
        for fut, error, _ in replies:
            if not fut.done():
                fut.set_exception(failed if error is None else error)
        # Spawns of this batch were refused to their callers: they never run.
        launch, self._launch = self._launch, []
        for runner in launch:
            runner.close()
            runner.settle_with = (TaskStatus.FAILED, None, failed)
            rec = self._state.get(runner.task_id)
            if rec is not None and rec.status not in TERMINAL:
                self._change(rec, TaskStatus.FAILED, error="not started: the store cannot write")
            self._runners.pop(runner.task_id, None)

    def post(self, msg: object) -> None:
        """Queue a fire-and-forget message (runner reports, report_progress)."""
        if self.closed:
            raise TrackerClosed("the tracker is closed")
        self._mailbox.put_nowait((msg, None))

    def _on_terminal(self, rec: TaskRecord) -> None:
        """A terminal record was committed: wake its waiters, send its webhook."""
        if rec.spec.callback_url is not None and self.on_terminal is not None:
            self.on_terminal(rec)
        self._wake_waiters(rec)

    def _wake_waiters(self, rec: TaskRecord) -> None:
        """Answer everyone waiting for this (terminal) record."""
        waiters = self._waiters.pop(rec.task_id, None)
        if waiters:
            if self._polls:
                self._polls.difference_update(waiters)
            for w in waiters:
                if not w.done():
                    w.set_result((rec, True))

    def _shut(self) -> None:
        """Fail every pending reply, waiter and handle; end every subscription."""
        self.closed = True
        unwritten = len(self._unwritten[0])
        if unwritten and self._persistent:
            # Never acknowledged (their callers got 503): the store never took them.
            log.error("closing with %d change(s) the store could not write", unwritten)
        closed = TrackerClosed("the tracker is closed")
        pending = [fut for fut, _, _ in self._replies]
        while not self._mailbox.empty():
            msg, fut = self._mailbox.get_nowait()
            if fut is not None:
                pending.append(fut)
            elif type(msg) is m.Spawn:  # a fast-path spawn: its handle waits on done
                msg.coro.close()
                msg.done.set(TaskStatus.FAILED, None, closed)
        for waiters in self._waiters.values():
            pending.extend(waiters)
        for runner in self._runners.values():
            runner.outcome.set(TaskStatus.FAILED, None, closed)
            if runner.task is not None and not runner.task.done():
                runner.task.cancel()
        for fut in pending:
            if not fut.done():
                fut.set_exception(closed)
        self._hub.close()
        self._replies.clear()
        self._waiters.clear()

    # --- time and timers ------------------------------------------------------------

    def _tick(self) -> float:
        # One reading per batch; never backwards, so updated_at never is either.
        now = self._clock()
        if now > self._now:
            self._now = now
        return self._now

    def _wake(self) -> None:
        if not self.closed:
            self._mailbox.put_nowait((_TICK, None))

    def _fire_timers(self) -> None:
        now = self._now
        state = self._state
        for kind, task_id, fut in self._timers.pop_due(now):
            if kind is Kind.RETRY:
                self._retry_due = True  # this batch's flush tries the write again
                continue
            rec = state.get(task_id)
            if kind is Kind.WAIT:
                assert fut is not None
                if self._unpark(task_id, fut):
                    self._replies.append((fut, None, (rec, False)))
            elif rec is None or rec.status in TERMINAL:
                continue
            elif kind is Kind.HEARTBEAT:
                last = self._last_beat.get(task_id)
                if last is None or rec.heartbeat_timeout is None:
                    continue
                if last + rec.heartbeat_timeout <= now:
                    self._change(rec, TaskStatus.FAILED, error="heartbeat timeout")
                else:
                    self._timers.push(last + rec.heartbeat_timeout, Kind.HEARTBEAT, task_id)
            elif kind is Kind.GRACE:
                if rec.status is not TaskStatus.CANCELLING:
                    continue
                if rec.updated_at + self._cancel_grace > now:  # it reported since
                    self._timers.push(rec.updated_at + self._cancel_grace, Kind.GRACE, task_id)
                    continue
                runner = self._runners.get(task_id)
                if runner is not None:
                    runner.settle_with = (TaskStatus.CANCELLED, None, None)
                self._change(rec, TaskStatus.CANCELLED, error=NOT_ACKNOWLEDGED)
            elif kind is Kind.TIMEOUT:
                runner = self._runners.get(task_id)
                if runner is not None and runner.task is not None and not runner.timed_out:
                    runner.timed_out = True
                    runner.task.cancel()
                    if rec.status is TaskStatus.RUNNING:
                        self._change(rec, TaskStatus.CANCELLING)
        state.expire(now)
        self._timers.reset_due(state.next_expiry())

    # --- changing records -----------------------------------------------------------

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
    ) -> TaskRecord:
        """Move ``rec`` to ``status`` (the state checks the transition table), then
        arrange what the actor owns: deadlines, heartbeats, the runner's outcome."""
        new = self._state.transition(
            rec,
            status,
            self._now,
            progress=progress,
            message=message,
            result=result,
            error=error,
            action=action,
        )
        if rec.status is not new.status:
            tid = new.task_id
            self.counters.on_change(rec.status, new)
            if new.status in TERMINAL:
                self._last_beat.pop(tid, None)
                expires = self._state.expires_at(new)
                if expires < self._timers.due:
                    self._timers.due = expires
                runner = self._runners.get(tid)
                if runner is not None:
                    # With the terminal record: the handle shows it once settled.
                    self._settle.append((runner, new))
            elif new.status is TaskStatus.CANCELLING:
                self._timers.push(self._now + self._cancel_grace, Kind.GRACE, tid)
        return new

    # --- handlers -------------------------------------------------------------------

    def _on_create(self, msg: m.Create) -> TaskRecord:
        spec = new_spec(msg.metadata, msg.owner, False, msg.callback_url, msg.heartbeat_timeout)

        def build(task_id: str, at: float) -> TaskRecord:
            return TaskRecord(
                task_id, msg.task_type, TaskStatus.PENDING, msg.resource_id, at, at, spec=spec
            )

        rec = self._state.insert(msg.task_type, msg.resource_id, msg.owner, self._now, build)
        if msg.heartbeat_timeout is not None:
            self._last_beat[rec.task_id] = rec.created_at
            self._timers.push(rec.created_at + msg.heartbeat_timeout, Kind.HEARTBEAT, rec.task_id)
        return rec

    def _on_spawn(self, msg: m.Spawn) -> TaskRecord:
        if msg.minted is not None:
            return self._spawn_minted(msg, msg.minted)
        spec = new_spec(msg.metadata, msg.owner, True, msg.callback_url, None)

        def build(task_id: str, at: float) -> TaskRecord:
            # Running from the start: the runner is launched right after this batch
            # commits and begins on the next loop iteration, so a pending state would
            # be visible to nobody; skipping it saves a record version.
            return TaskRecord(
                task_id, msg.task_type, TaskStatus.RUNNING, msg.resource_id, at, at, at, spec=spec
            )

        rec = self._state.insert(msg.task_type, msg.resource_id, msg.owner, self._now, build)
        return self._add_runner(msg, rec)

    def _add_runner(self, msg: m.Spawn, rec: TaskRecord) -> TaskRecord:
        """Book the runner of a spawned record; it starts once the batch is committed."""
        runner = Runner(self.post, rec.task_id, msg.coro, msg.context, msg.done, msg.timeout)
        self.counters.on_started(rec)  # running from its creation: it waited 0 s
        self._runners[rec.task_id] = runner
        self._launch.append(runner)
        if msg.timeout is not None:
            self._timers.push(self._now + msg.timeout, Kind.TIMEOUT, rec.task_id)
        return rec

    def _spawn_minted(self, msg: m.Spawn, rec: TaskRecord) -> TaskRecord:
        try:
            self._state.insert_minted(rec)
        except TaskdError as exc:
            # admits() said there was room; if that ever fails to hold, the handle the
            # caller already has gets the refusal and the coroutine never runs.
            msg.coro.close()
            msg.done.set(TaskStatus.FAILED, None, exc)
            raise
        return self._add_runner(msg, rec)

    # --- the spawn fast path (called by the tracker, on the actor's thread) -----------

    def admits(self) -> bool:
        """Whether a spawn without resource_id may skip the reply: nothing to commit
        first (no persistent store), no per-owner quota, and room under the cap even
        if every message still in the mailbox inserts a task. Read between the
        actor's batches (one thread): the counts are the committed state."""
        state = self._state
        return (
            not self._persistent
            and not self._draining
            and not self.closed
            and state.quota is None
            and state.active + self._mailbox.qsize() < state.cap
        )

    def settled(self) -> bool:
        """Whether a read may skip the mailbox now (the read fast path; called by the
        tracker, between the actor's batches). Only when the answer cannot differ
        from the actor's: no persistent store (a batch never suspends half-committed),
        an empty mailbox (every command sent before, fire-and-forget ones included,
        has been applied), and no timer due (the actor would expire records first)."""
        return not (
            self._persistent
            or self.closed
            or not self._mailbox.empty()
            or self._clock() >= self._timers.due
        )

    def peek(self, task_id: str, owner: OwnerScope) -> TaskRecord | _Deferred | None:
        """The record as a ``Get`` would answer it now, or ``_DEFERRED`` when only
        the actor may answer (see ``settled``)."""
        return self._read(task_id, owner) if self.settled() else _DEFERRED

    def mint(self, now: float) -> tuple[str, float]:
        """A new task id, from the state's one sequence (for the fast path)."""
        return self._state.mint(now)

    def _beat(self, task_id: str) -> None:
        if task_id in self._last_beat:
            self._last_beat[task_id] = self._now

    def _external(self, msg: m.Start | m.Complete | m.Fail, action: str) -> TaskRecord:
        rec = self._state.visible(msg.task_id, msg.owner)
        if rec.in_process and rec.status not in TERMINAL:
            # Its runner reports how it ends; a second source of truth would race it.
            raise InvalidTransition(rec.task_id, "run by the tracker itself", action)
        return rec

    def _on_start(self, msg: m.Start) -> TaskRecord:
        rec = self._external(msg, "start")
        if rec.status is not TaskStatus.PENDING:
            raise InvalidTransition(rec.task_id, rec.status.value, "start")
        self._beat(rec.task_id)
        return self._change(rec, TaskStatus.RUNNING, action="start")

    def _on_progress(self, msg: m.Progress) -> TaskRecord:
        rec = self._state.visible(msg.task_id, msg.owner)
        if rec.status not in ACTIVE:
            raise InvalidTransition(rec.task_id, rec.status.value, "report progress on")
        self._beat(rec.task_id)
        return self._change(rec, rec.status, progress=msg.progress, message=msg.message)

    def _on_complete(self, msg: m.Complete) -> TaskRecord:
        rec = self._external(msg, "complete")
        return self._change(rec, TaskStatus.COMPLETED, result=msg.result, action="complete")

    def _on_fail(self, msg: m.Fail) -> TaskRecord:
        rec = self._external(msg, "fail")
        return self._change(rec, TaskStatus.FAILED, error=msg.error, action="fail")

    def _on_cancel(self, msg: m.Cancel) -> TaskRecord:
        rec = self._state.visible(msg.task_id, msg.owner)
        status = rec.status
        if status in TERMINAL:
            raise InvalidTransition(rec.task_id, status.value, "cancel")
        runner = self._runners.get(rec.task_id)
        if runner is None:
            # External: pending stops at once, running is asked (the worker sees
            # cancelling on its next report), cancelling is the worker confirming.
            if status is TaskStatus.RUNNING:
                return self._change(rec, TaskStatus.CANCELLING, action="cancel")
            return self._change(rec, TaskStatus.CANCELLED, error=msg.reason)
        if runner.task is None:
            # Spawned in this same batch and not launched yet: it never starts.
            runner.settle_with = (TaskStatus.CANCELLED, None, None)
            new = self._change(rec, TaskStatus.CANCELLED, error=msg.reason)
            self._launch.remove(runner)
            runner.close()
            del self._runners[rec.task_id]
            return new
        # Spawned and running: cancelling until the coroutine has unwound.
        runner.task.cancel()
        if status is TaskStatus.CANCELLING:
            return rec
        return self._change(rec, TaskStatus.CANCELLING, action="cancel")

    def _on_delete(self, msg: m.Delete) -> None:
        self._state.delete(msg.task_id, msg.owner)

    def _on_get(self, msg: m.Get) -> TaskRecord | None:
        return self._read(msg.task_id, msg.owner)

    def _read(self, task_id: str, owner: OwnerScope) -> TaskRecord | None:
        rec = self._state.get(task_id)
        if rec is None or (owner is not ANY_OWNER and rec.owner != owner):
            return None
        return rec

    def _on_wait(
        self, msg: m.Wait, fut: asyncio.Future[Any] | None
    ) -> tuple[TaskRecord | None, bool] | _Deferred:
        return self._wait_on(msg, fut, self._state.visible(msg.task_id, msg.owner))

    def _wait_on(
        self, msg: m.Wait, fut: asyncio.Future[Any] | None, rec: TaskRecord
    ) -> tuple[TaskRecord | None, bool] | _Deferred:
        """Answer a wait now (terminal, no wait asked, or polls released), or park
        ``fut`` until the task ends or the wait's deadline."""
        if (
            rec.status in TERMINAL
            or msg.timeout == 0
            or fut is None
            or (msg.poll and self._polls_released)
        ):
            return (rec, rec.status in TERMINAL)
        if msg.poll:
            self._polls.add(fut)
        waiters = self._waiters.get(rec.task_id)
        if waiters is None:
            waiters = self._waiters[rec.task_id] = set()
        waiters.add(fut)
        if msg.timeout is not None:
            self._timers.push(self._now + msg.timeout, Kind.WAIT, rec.task_id, fut)
        return _DEFERRED

    def _unpark(self, task_id: str, fut: asyncio.Future[Any]) -> bool:
        """A wait's deadline passed: forget its future; True if it still needs an answer."""
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            waiters.discard(fut)
        self._polls.discard(fut)
        return not fut.done()

    def _on_release_polls(self, msg: m.ReleasePolls) -> int:
        self._polls_released = True
        polls, self._polls = self._polls, set()
        for task_id, waiters in list(self._waiters.items()):
            for fut in waiters & polls:
                waiters.discard(fut)
                if not fut.done():
                    self._answer_released(task_id, fut)
            if not waiters:
                del self._waiters[task_id]
        return len(polls)

    def _answer_released(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        """A long-poll released at shutdown gets the latest record, not terminal."""
        self._replies.append((fut, None, (self._state.get(task_id), False)))

    def _on_unwait(self, msg: m.Unwait) -> None:
        self._polls.discard(msg.fut)
        waiters = self._waiters.get(msg.task_id)
        if waiters is not None:
            waiters.discard(msg.fut)
            if not waiters:
                del self._waiters[msg.task_id]

    def _on_subscribe(self, msg: m.Subscribe) -> TaskRecord | None:
        sub = msg.subscription
        rec = None if sub.task_id is None else self._state.visible(sub.task_id, sub.owner)
        state = self._state
        self._hub.subscribe(sub, rec, state.seq, state.pending_changes)
        return rec

    def _on_unsubscribe(self, msg: m.Unsubscribe) -> None:
        self._hub.unsubscribe(msg.subscription)

    def _on_stats(self, msg: m.Stats) -> TrackerStats:
        return {
            "counts": self._state.counts(),
            "records": len(self._state),
            "active": self._state.active,
            "mailbox_depth": self._mailbox.qsize(),
            "commands": self.commands,
            "runners": len(self._runners),
            "subscriptions": len(self._hub),
            "waiters": sum(map(len, self._waiters.values())),
            "finished": self.counters.snapshot(self._now),
        }

    def _on_runner_finished(self, msg: m.RunnerFinished) -> None:
        runner = self._runners.get(msg.task_id)
        rec = self._state.get(msg.task_id)
        if runner is None:
            return
        if rec is None or rec.status in TERMINAL:
            # Already recorded (cancelled while pending, or abandoned at shutdown).
            del self._runners[msg.task_id]
            return
        try:
            if msg.outcome is TaskStatus.COMPLETED:
                runner.settle_with = (TaskStatus.COMPLETED, msg.value, None)
                self._change(rec, TaskStatus.COMPLETED, result=msg.result)
            elif msg.outcome is TaskStatus.FAILED:
                runner.settle_with = (TaskStatus.FAILED, None, msg.exc)
                self._change(rec, TaskStatus.FAILED, error=msg.error)
            elif runner.timed_out:
                text = f"timeout: did not finish within {runner.timeout:g} seconds"
                runner.settle_with = (TaskStatus.FAILED, None, TimeoutError(text))
                self._change(rec, TaskStatus.FAILED, error=text)
            else:
                reason = "cancelled: tracker shutting down" if self._draining else "cancelled"
                runner.settle_with = (TaskStatus.CANCELLED, None, None)
                self._change(rec, TaskStatus.CANCELLED, error=reason)
        finally:
            self._runners.pop(msg.task_id, None)

    def _on_drain(self, msg: m.Drain) -> dict[str, asyncio.Task[None]]:
        self._draining = True
        if self._launch and not self._persistent:
            # Spawns of this very batch (the fast path: their callers already hold
            # handles) start now, so that shutdown waits for them like the others.
            self._start_runners()
        self._on_release_polls(m.ReleasePolls())
        return {tid: r.task for tid, r in self._runners.items() if r.task is not None}

    def _on_abandon(self, msg: m.Abandon) -> None:
        for task_id in msg.task_ids:
            runner = self._runners.get(task_id)
            rec = self._state.get(task_id)
            if runner is not None:
                runner.settle_with = (TaskStatus.CANCELLED, None, None)
            if rec is not None and rec.status not in TERMINAL:
                self._change(rec, TaskStatus.CANCELLED, error=msg.reason)  # settles it
            self._runners.pop(task_id, None)

    def _on_tick(self, msg: m.Tick) -> None:
        """Nothing to do: the batch that carries a Tick fires due timers first."""

    def _on_stop(self, msg: m.Stop) -> None:
        self._stopping = True
