"""The actor: the one asyncio task that owns every record.

Everything here runs inside that task, so no lock guards any of it. The loop takes a
batch of messages from the mailbox, fires due timers, handles each message (a handler
that raises answers its own caller; the loop goes on), writes the batch's changes to
the store in one call (group commit), and only then answers callers, wakes waiters,
feeds subscriptions and starts runners. If the loop itself dies, ``_shut`` fails every
pending reply with ``TrackerClosed`` so that nothing hangs.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import secrets
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from . import _messages as m
from ._errors import (
    InvalidTransition,
    QuotaExceeded,
    StoreError,
    TaskConflict,
    TaskdError,
    TaskNotFound,
    TrackerClosed,
    TrackerFull,
)
from ._models import (
    ACTIVE,
    ANY_OWNER,
    DEFAULT_SPEC,
    JSON,
    TERMINAL,
    TRANSITIONS,
    OwnerScope,
    RawJSON,
    TaskRecord,
    TaskSpec,
    TaskStatus,
)
from ._retention import ExpiryQueues, Retention
from ._runner import Outcome, start_runner
from ._store import Store
from ._watch import Subscription

if TYPE_CHECKING:
    from ._tracker import TrackerStats

log = logging.getLogger("taskd")

MAX_BATCH: Final = 512
RECENT_EVENTS: Final = 512
# Deadline kinds in the timer heap.
_HEARTBEAT: Final = 0
_TIMEOUT: Final = 1
_WAIT: Final = 2
_GRACE: Final = 3
_RETRY: Final = 4
#: Seconds between attempts to write to a store that failed.
STORE_RETRY: Final = 0.5
#: Caller commands refused while the store cannot write (they would change records).
_WRITES: Final = frozenset(
    {m.Create, m.Spawn, m.Start, m.Progress, m.Complete, m.Fail, m.Cancel, m.Delete}
)
#: The error of a cancelling task whose worker did not confirm within cancel_grace.
NOT_ACKNOWLEDGED: Final = "cancel not acknowledged"

#: A mailbox item: a message and the future its reply goes to (None: no reply).
#: The future's type is the message's ``Request[R]``; the mailbox holds all kinds.
MailboxItem = tuple[object, "asyncio.Future[Any] | None"]
# A reply waiting for the batch's commit: (future, succeeded, value-or-exception).
_Reply = tuple["asyncio.Future[Any]", "BaseException | None", object]


class _Deferred:
    """Returned by a handler that answers later (``Wait``)."""


_DEFERRED: Final = _Deferred()
_TICK: Final = m.Tick()


@dataclass(slots=True)
class _Runner:
    """Actor-side bookkeeping of one spawned coroutine."""

    task_id: str
    done: Outcome[Any]
    task: asyncio.Task[None] | None = None
    timeout: float | None = None
    timed_out: bool = False
    #: How to settle ``done`` once the record is terminal: (status, value, exc).
    outcome: tuple[TaskStatus, object, BaseException | None] | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, and the cursor of the next (None at the end)."""

    records: tuple[TaskRecord, ...]
    next_cursor: str | None


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
        self._retention = retention
        self._store = store
        self._persistent = store.persistent
        self._clock = clock
        self._cancel_grace = cancel_grace
        self.closed = False
        self.commands = 0
        #: Called with each terminal record that has a callback_url, after its commit.
        self.on_terminal: Callable[[TaskRecord], None] | None = None

        self._records: dict[str, TaskRecord] = {}
        self._by_status: dict[TaskStatus, SortedList] = {s: SortedList() for s in TaskStatus}
        self._by_type: dict[str, SortedList] = {}
        self._by_owner: dict[str, SortedList] = {}
        # Resource ids are mostly unique: the value is the one task id itself until a
        # second task shares the resource, then a plain list (sorted by construction,
        # ids grow). A list or SortedList per key would cost ~80-500 bytes a record.
        self._by_resource: dict[str, str | list[str]] = {}
        self._counts: dict[tuple[str, TaskStatus], int] = {}
        self._active_keys: dict[tuple[str | None, str, str], str] = {}
        self._active = 0
        # Active tasks per owner, kept only when a per-owner quota is set.
        self._quota = retention.max_active_per_owner
        self._active_by_owner: dict[str | None, int] = {}
        #: Why the store cannot write (None while it can); /health reports it.
        self.store_error: str | None = None
        self._retry_due = False

        self._expiry = ExpiryQueues(retention)
        self._timers: list[tuple[float, int, int, str, asyncio.Future[Any] | None]] = []
        self._timer_seq = 0
        self._last_beat: dict[str, float] = {}
        self._runners: dict[str, _Runner] = {}
        self._waiters: dict[str, set[asyncio.Future[Any]]] = {}
        # The waiters that are long-polls (answered early at shutdown), and whether
        # that has happened (later polls are then answered at once).
        self._polls: set[asyncio.Future[Any]] = set()
        self._polls_released = False
        self._task_subs: dict[str, list[Subscription]] = {}
        self._global_subs: list[Subscription] = []

        # The latest changes, for Last-Event-ID resumption of event streams. Small on
        # purpose (it keeps old record versions alive), and only kept once somebody
        # has subscribed: a tracker nobody streams from pays nothing for it.
        self._recent: deque[tuple[int, TaskRecord]] | None = None
        self._now = 0.0
        # Earliest deadline of any timer (may be early, never late), and the instant
        # the loop timer is armed for.
        self._due = math.inf
        self._armed_at = math.inf
        self._wake_handle: asyncio.TimerHandle | None = None
        self._last_stamp = 0
        # Event ids (SSE) start at this boot's wall-clock instant in microseconds, so
        # that they stay unique and increasing across restarts: the actor emits far
        # fewer than one change per microsecond, so a boot's ids stay below the next
        # boot's start. An id below it is from an earlier boot: no replay is possible.
        self.boot_seq = int(clock() * 1_000_000)
        self._event_seq = self.boot_seq
        self._draining = False
        self._stopping = False

        # Per-batch effects, applied after the commit.
        self._replies: list[_Reply] = []
        self._changed: list[tuple[int, TaskRecord]] = []
        self._dirty: dict[str, TaskRecord | None] = {}
        self._launch: list[tuple[_Runner, m.Spawn]] = []
        self._settle: list[_Runner] = []

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
            m.ListTasks: self._on_list,
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
        """Rebuild state from the store before the loop starts (oldest first)."""
        self._tick()
        interrupted: list[TaskRecord] = []
        for rec in sorted(records, key=lambda r: r.task_id):
            self._records[rec.task_id] = rec
            self._index_add(rec)
            stamp = int(rec.task_id[:13], 16)
            self._last_stamp = max(self._last_stamp, stamp)
            if rec.status in TERMINAL:
                self._expiry.push(rec.status, rec.task_id, 0.0)
            else:
                self._active += 1
                if self._quota is not None:
                    self._active_by_owner[rec.owner] = self._active_by_owner.get(rec.owner, 0) + 1
                if rec.resource_id is not None:
                    self._active_keys[(rec.owner, rec.task_type, rec.resource_id)] = rec.task_id
                if rec.in_process:
                    interrupted.append(rec)
                elif rec.status is TaskStatus.CANCELLING:
                    self._push_timer(rec.updated_at + self._cancel_grace, _GRACE, rec.task_id)
                elif rec.heartbeat_timeout is not None:
                    self._last_beat[rec.task_id] = rec.updated_at
                    self._push_timer(
                        rec.updated_at + rec.heartbeat_timeout, _HEARTBEAT, rec.task_id
                    )
        # The process that ran these coroutines is gone: nobody will finish them.
        for rec in interrupted:
            self._change(rec, TaskStatus.FAILED, error="interrupted: tracker restarted")
        self._fire_timers()

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """The mailbox loop. Returns after ``Stop``; on any exit fails what is pending."""
        queue = self._mailbox
        try:
            await self._flush()  # what load() changed (interrupted tasks, purges)
            while not self._stopping:
                first = queue.get_nowait() if not queue.empty() else await queue.get()
                batch = [first]
                while len(batch) < MAX_BATCH and not queue.empty():
                    batch.append(queue.get_nowait())
                if self._tick() >= self._due:
                    self._fire_timers()
                for msg, fut in batch:
                    self._dispatch(msg, fut)
                self.commands += len(batch)
                await self._flush()
                if self._due < self._armed_at:
                    self._arm()
        finally:
            if self._wake_handle is not None:
                self._wake_handle.cancel()
            self._shut()

    def _dispatch(self, msg: object, fut: asyncio.Future[Any] | None) -> None:
        if self.store_error is not None and fut is not None and type(msg) in _WRITES:
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
        if self._dirty:
            if not self._persistent:
                self._dirty.clear()
            elif self.store_error is None or self._retry_due:
                self._retry_due = False
                upserts = [r for r in self._dirty.values() if r is not None]
                deletes = [i for i, r in self._dirty.items() if r is None]
                try:
                    await self._store.write(upserts, deletes)
                except Exception as exc:
                    first = self.store_error is None
                    self._write_failed(exc, refuse=first)
                    if first:
                        return
                else:
                    if self.store_error is not None:
                        log.warning("the store writes again: %d change(s) committed", len(upserts))
                        self.store_error = None
                    self._dirty.clear()
        replies, self._replies = self._replies, []
        for fut, error, value in replies:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)
        if self.store_error is not None:
            return  # what changed is not committed yet: nobody hears of it until it is
        if self._changed:
            changed, self._changed = self._changed, []
            self._notify(changed)
        if self._settle:
            settle, self._settle = self._settle, []
            for runner in settle:
                self._settle_handle(runner)
        if self._launch:
            launch, self._launch = self._launch, []
            for runner, msg in launch:
                runner.task = start_runner(self.post, runner.task_id, msg.coro, msg.context)

    def _write_failed(self, exc: Exception, *, refuse: bool) -> None:
        """The store could not commit. The first failing batch's callers get
        ``StoreError`` (503): nothing is acknowledged that is not on disk. The changes
        stay in memory and pending (``_dirty``), as do their notifications, and are
        written by a later attempt; until then caller commands that would change a
        record are refused up front (reads go on), and a timer retries the write."""
        reason = f"{type(exc).__name__}: {exc}"
        if self.store_error is None:
            log.error("the store cannot write; refusing changes until it can: %s", reason)
        self.store_error = reason
        self._push_timer(self._now + STORE_RETRY, _RETRY, "")
        if not refuse:
            return
        failed = StoreError(f"the store cannot write: {reason}")
        replies, self._replies = self._replies, []
        for fut, error, _ in replies:
            if not fut.done():
                fut.set_exception(failed if error is None else error)
        # Spawns of this batch were refused to their callers: they never run.
        launch, self._launch = self._launch, []
        for runner, msg in launch:
            msg.coro.close()
            runner.outcome = (TaskStatus.FAILED, None, failed)
            rec = self._records.get(runner.task_id)
            if rec is not None and rec.status not in TERMINAL:
                self._change(rec, TaskStatus.FAILED, error="not started: the store cannot write")
            self._runners.pop(runner.task_id, None)

    def post(self, msg: object) -> None:
        """Queue a fire-and-forget message (runner reports, report_progress)."""
        if self.closed:
            raise TrackerClosed("the tracker is closed")
        self._mailbox.put_nowait((msg, None))

    def _notify(self, changed: list[tuple[int, TaskRecord]]) -> None:
        task_subs = self._task_subs
        global_subs = self._global_subs
        for seq, rec in changed:
            subs = task_subs.get(rec.task_id) if task_subs else None
            if subs:
                for sub in subs:
                    sub.push(seq, rec)
            for sub in global_subs:
                if sub.matches(rec):
                    sub.push(seq, rec)
            if rec.status in TERMINAL:
                if subs:
                    for sub in subs:
                        sub.end()
                    del task_subs[rec.task_id]
                if rec.spec.callback_url is not None and self.on_terminal is not None:
                    self.on_terminal(rec)
                waiters = self._waiters.pop(rec.task_id, None)
                if waiters:
                    if self._polls:
                        self._polls.difference_update(waiters)
                    for w in waiters:
                        if not w.done():
                            w.set_result((rec, True))
        if global_subs and any(s.ended for s in global_subs):
            # overflowed or ended from outside: drop them once, after the whole batch
            self._global_subs = [s for s in global_subs if not s.ended]

    def _settle_handle(self, runner: _Runner) -> None:
        if runner.outcome is not None:
            runner.done.set(*runner.outcome)

    def _shut(self) -> None:
        """Fail every pending reply, waiter and handle; end every subscription."""
        self.closed = True
        if self._dirty and self._persistent:
            # Never acknowledged (their callers got 503): the store never took them.
            log.error("closing with %d change(s) the store could not write", len(self._dirty))
        closed = TrackerClosed("the tracker is closed")
        pending = [fut for fut, _, _ in self._replies]
        while not self._mailbox.empty():
            _, fut = self._mailbox.get_nowait()
            if fut is not None:
                pending.append(fut)
        for waiters in self._waiters.values():
            pending.extend(waiters)
        for runner in self._runners.values():
            runner.done.set(TaskStatus.FAILED, None, closed)
            if runner.task is not None and not runner.task.done():
                runner.task.cancel()
        for fut in pending:
            if not fut.done():
                fut.set_exception(closed)
        for subs in self._task_subs.values():
            for sub in subs:
                sub.end()
        for sub in self._global_subs:
            sub.end()
        self._replies.clear()
        self._waiters.clear()
        self._task_subs.clear()
        self._global_subs.clear()

    # --- time and timers ------------------------------------------------------------

    def _tick(self) -> float:
        # One reading per batch; never backwards, so updated_at never is either.
        now = self._clock()
        if now > self._now:
            self._now = now
        return self._now

    def _arm(self) -> None:
        """Have the event loop post a Tick at the earliest deadline.

        One loop timer for all of taskd's timers: it is only replaced when a nearer
        deadline appears, so the mailbox loop itself never waits with a timeout.
        """
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        loop = asyncio.get_running_loop()
        delay = max(self._due - self._clock(), 0.0)
        self._wake_handle = loop.call_at(loop.time() + delay, self._wake)
        self._armed_at = self._due

    def _wake(self) -> None:
        self._wake_handle = None
        self._armed_at = math.inf
        if not self.closed:
            self._mailbox.put_nowait((_TICK, None))

    def _push_timer(
        self, when: float, kind: int, task_id: str, fut: asyncio.Future[Any] | None = None
    ) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, task_id, fut))
        if when < self._due:
            self._due = when

    def _next_deadline(self) -> float | None:
        deadline = self._expiry.next_deadline(self._records.get)
        if self._timers and (deadline is None or self._timers[0][0] < deadline):
            deadline = self._timers[0][0]
        return deadline

    def _fire_timers(self) -> None:
        now = self._now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, task_id, fut = heapq.heappop(timers)
            if kind == _RETRY:
                self._retry_due = True  # this batch's flush tries the write again
                continue
            rec = self._records.get(task_id)
            if kind == _WAIT:
                assert fut is not None
                waiters = self._waiters.get(task_id)
                if waiters is not None:
                    waiters.discard(fut)
                self._polls.discard(fut)
                if not fut.done():
                    self._replies.append((fut, None, (rec, False)))
            elif rec is None or rec.status in TERMINAL:
                continue
            elif kind == _HEARTBEAT:
                last = self._last_beat.get(task_id)
                if last is None or rec.heartbeat_timeout is None:
                    continue
                if last + rec.heartbeat_timeout <= now:
                    self._change(rec, TaskStatus.FAILED, error="heartbeat timeout")
                else:
                    self._push_timer(last + rec.heartbeat_timeout, _HEARTBEAT, task_id)
            elif kind == _GRACE:
                if rec.status is not TaskStatus.CANCELLING:
                    continue
                if rec.updated_at + self._cancel_grace > now:  # it reported since
                    self._push_timer(rec.updated_at + self._cancel_grace, _GRACE, task_id)
                    continue
                runner = self._runners.get(task_id)
                if runner is not None:
                    runner.outcome = (TaskStatus.CANCELLED, None, None)
                self._change(rec, TaskStatus.CANCELLED, error=NOT_ACKNOWLEDGED)
            elif kind == _TIMEOUT:
                runner = self._runners.get(task_id)
                if runner is not None and runner.task is not None and not runner.timed_out:
                    runner.timed_out = True
                    runner.task.cancel()
                    if rec.status is TaskStatus.RUNNING:
                        self._change(rec, TaskStatus.CANCELLING)
        expired = self._expiry.pop_due(now, self._records.get)
        for task_id in expired:
            self._remove(task_id)
        deadline = self._next_deadline()
        self._due = math.inf if deadline is None else deadline

    # --- indexes --------------------------------------------------------------------

    def _index_add(self, rec: TaskRecord) -> None:
        tid = rec.task_id
        self._by_status[rec.status].add(tid)
        by_type = self._by_type.get(rec.task_type)
        if by_type is None:
            by_type = self._by_type[rec.task_type] = SortedList()
        by_type.add(tid)
        if rec.owner is not None:
            by_owner = self._by_owner.get(rec.owner)
            if by_owner is None:
                by_owner = self._by_owner[rec.owner] = SortedList()
            by_owner.add(tid)
        if rec.resource_id is not None:
            ids = self._by_resource.get(rec.resource_id)
            if ids is None:
                self._by_resource[rec.resource_id] = tid
            elif isinstance(ids, str):
                self._by_resource[rec.resource_id] = sorted((ids, tid))
            elif ids[-1] < tid:
                ids.append(tid)
            else:
                ids.insert(bisect_left(ids, tid), tid)
        key = (rec.task_type, rec.status)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _index_remove(self, rec: TaskRecord) -> None:
        tid = rec.task_id
        self._by_status[rec.status].remove(tid)
        by_type = self._by_type[rec.task_type]
        by_type.remove(tid)
        if not by_type:
            del self._by_type[rec.task_type]
        if rec.owner is not None:
            by_owner = self._by_owner[rec.owner]
            by_owner.remove(tid)
            if not by_owner:
                del self._by_owner[rec.owner]
        if rec.resource_id is not None:
            ids = self._by_resource[rec.resource_id]
            if isinstance(ids, str):
                del self._by_resource[rec.resource_id]
            else:
                del ids[bisect_left(ids, tid)]
                if len(ids) == 1:
                    self._by_resource[rec.resource_id] = ids[0]
        key = (rec.task_type, rec.status)
        self._counts[key] -= 1

    # --- changing records -----------------------------------------------------------

    def _store_record(self, old: TaskRecord, new: TaskRecord) -> None:
        tid = new.task_id
        self._records[tid] = new
        if old.status is not new.status:
            self._by_status[old.status].remove(tid)
            self._by_status[new.status].add(tid)
            okey = (old.task_type, old.status)
            self._counts[okey] -= 1
            nkey = (new.task_type, new.status)
            self._counts[nkey] = self._counts.get(nkey, 0) + 1
            if new.status in TERMINAL:
                self._active -= 1
                if self._quota is not None:
                    self._active_by_owner[new.owner] -= 1
                if new.resource_id is not None:
                    key = (new.owner, new.task_type, new.resource_id)
                    if self._active_keys.get(key) == tid:
                        del self._active_keys[key]
                self._last_beat.pop(tid, None)
                expires = self._expiry.push(new.status, tid, self._now)
                if expires < self._due:
                    self._due = expires
                runner = self._runners.get(tid)
                if runner is not None:
                    self._settle.append(runner)
            elif new.status is TaskStatus.CANCELLING:
                self._push_timer(self._now + self._cancel_grace, _GRACE, tid)
        self._dirty[tid] = new
        self._event_seq += 1
        self._changed.append((self._event_seq, new))
        if self._recent is not None:
            self._recent.append((self._event_seq, new))

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
        """Move ``rec`` to ``status`` if the transition table allows it."""
        if rec.status in TERMINAL or (
            status is not rec.status and status not in TRANSITIONS[rec.status]
        ):
            raise InvalidTransition(rec.task_id, rec.status.value, action or status.value)
        now = self._now if self._now > rec.updated_at else rec.updated_at
        terminal = status in TERMINAL
        new = rec.evolve(
            status=status,
            updated_at=now,
            started_at=now
            if status is TaskStatus.RUNNING and rec.started_at is None
            else rec.started_at,
            finished_at=now if terminal else None,
            progress=1.0
            if status is TaskStatus.COMPLETED
            else (rec.progress if progress is None else progress),
            # A completed task's last stage ("halfway") no longer describes it; a failed
            # or cancelled one keeps it: it says where the work stopped.
            message=None
            if status is TaskStatus.COMPLETED
            else (rec.message if message is None else message),
            result=result if status is TaskStatus.COMPLETED else None,
            error=error if status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
        )
        self._store_record(rec, new)
        return new

    def _remove(self, task_id: str) -> None:
        rec = self._records.pop(task_id)
        self._index_remove(rec)
        self._dirty[task_id] = None

    def _visible(self, task_id: str, owner: OwnerScope) -> TaskRecord:
        rec = self._records.get(task_id)
        if rec is None or (owner is not ANY_OWNER and rec.owner != owner):
            raise TaskNotFound(task_id)
        return rec

    def _insert(
        self,
        task_type: str,
        resource_id: str | None,
        owner: str | None,
        build: Callable[[str, float], TaskRecord],
    ) -> TaskRecord:
        """Dedup, make room under the cap, then insert a new record (one message)."""
        if resource_id is not None:
            holder = self._active_keys.get((owner, task_type, resource_id))
            if holder is not None:
                raise TaskConflict(holder, task_type, resource_id)
        if self._quota is not None and self._active_by_owner.get(owner, 0) >= self._quota:
            raise QuotaExceeded(owner, self._quota)
        cap = self._retention.max_tasks
        if len(self._records) >= cap:
            if self._active >= cap:
                raise TrackerFull(f"all {cap} task slots hold active tasks")
            while len(self._records) >= cap:
                self._remove(self._oldest_terminal())
            self._expiry.compact(len(self._records) - self._active, self._records.get)
        stamp = int(self._now * 1_000_000)
        if stamp <= self._last_stamp:
            stamp = self._last_stamp + 1
        self._last_stamp = stamp
        # The id starts with its creation instant in fixed-width hex, so ids sort in
        # creation order (which every index relies on), then carries 128 random bits.
        task_id = f"{stamp:013x}{secrets.token_urlsafe(16)}"
        rec = build(task_id, stamp / 1_000_000)
        self._records[task_id] = rec
        self._index_add(rec)
        self._active += 1
        if self._quota is not None:
            self._active_by_owner[owner] = self._active_by_owner.get(owner, 0) + 1
        if resource_id is not None:
            self._active_keys[(owner, task_type, resource_id)] = task_id
        self._dirty[task_id] = rec
        self._event_seq += 1
        self._changed.append((self._event_seq, rec))
        if self._recent is not None:
            self._recent.append((self._event_seq, rec))
        return rec

    def _oldest_terminal(self) -> str:
        heads: list[str] = [self._by_status[s][0] for s in TERMINAL if self._by_status[s]]
        return min(heads)

    # --- handlers -------------------------------------------------------------------

    def _on_create(self, msg: m.Create) -> TaskRecord:
        def build(task_id: str, at: float) -> TaskRecord:
            return TaskRecord(
                task_id,
                msg.task_type,
                TaskStatus.PENDING,
                msg.resource_id,
                at,
                at,
                spec=spec,
            )

        spec = _spec(msg.metadata, msg.owner, False, msg.callback_url, msg.heartbeat_timeout)

        rec = self._insert(msg.task_type, msg.resource_id, msg.owner, build)
        if msg.heartbeat_timeout is not None:
            self._last_beat[rec.task_id] = rec.created_at
            self._push_timer(rec.created_at + msg.heartbeat_timeout, _HEARTBEAT, rec.task_id)
        return rec

    def _on_spawn(self, msg: m.Spawn) -> TaskRecord:
        def build(task_id: str, at: float) -> TaskRecord:
            return TaskRecord(
                task_id,
                msg.task_type,
                # Running from the start: the runner is launched right after this
                # batch commits and begins on the next loop iteration, so a pending
                # state would be visible to nobody; skipping it saves a record version.
                TaskStatus.RUNNING,
                msg.resource_id,
                at,
                at,
                at,
                spec=spec,
            )

        spec = _spec(msg.metadata, msg.owner, True, msg.callback_url, None)

        rec = self._insert(msg.task_type, msg.resource_id, msg.owner, build)
        runner = _Runner(rec.task_id, msg.done, timeout=msg.timeout)
        self._runners[rec.task_id] = runner
        self._launch.append((runner, msg))
        if msg.timeout is not None:
            self._push_timer(self._now + msg.timeout, _TIMEOUT, rec.task_id)
        return rec

    def _beat(self, task_id: str) -> None:
        if task_id in self._last_beat:
            self._last_beat[task_id] = self._now

    def _external(self, msg: m.Start | m.Complete | m.Fail, action: str) -> TaskRecord:
        rec = self._visible(msg.task_id, msg.owner)
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
        rec = self._visible(msg.task_id, msg.owner)
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
        rec = self._visible(msg.task_id, msg.owner)
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
            runner.outcome = (TaskStatus.CANCELLED, None, None)
            new = self._change(rec, TaskStatus.CANCELLED, error=msg.reason)
            for pair in self._launch:
                if pair[0] is runner:
                    self._launch.remove(pair)
                    pair[1].coro.close()
                    break
            del self._runners[rec.task_id]
            return new
        # Spawned and running: cancelling until the coroutine has unwound.
        runner.task.cancel()
        if status is TaskStatus.CANCELLING:
            return rec
        return self._change(rec, TaskStatus.CANCELLING, action="cancel")

    def _on_delete(self, msg: m.Delete) -> None:
        rec = self._visible(msg.task_id, msg.owner)
        if rec.status not in TERMINAL:
            raise InvalidTransition(rec.task_id, rec.status.value, "delete")
        self._remove(rec.task_id)
        self._expiry.compact(len(self._records) - self._active, self._records.get)

    def _on_get(self, msg: m.Get) -> TaskRecord | None:
        rec = self._records.get(msg.task_id)
        if rec is None or (msg.owner is not ANY_OWNER and rec.owner != msg.owner):
            return None
        return rec

    def _on_list(self, msg: m.ListTasks) -> Page:
        out: list[TaskRecord] = []
        records = self._records
        owner = msg.owner
        statuses = msg.statuses
        limit = msg.limit
        for tid in self._candidates(msg):
            rec = records[tid]
            if owner is not ANY_OWNER and rec.owner != owner:
                continue
            if statuses is not None and rec.status not in statuses:
                continue
            if msg.task_type is not None and rec.task_type != msg.task_type:
                continue
            if msg.resource_id is not None and rec.resource_id != msg.resource_id:
                continue
            if len(out) == limit:
                return Page(tuple(out), out[-1].task_id)
            out.append(rec)
        return Page(tuple(out), None)

    def _candidates(self, msg: m.ListTasks) -> Iterator[str]:
        """Ids, newest first, from the smallest index that covers a filter."""
        before = msg.before
        options: list[tuple[int, Callable[[], Iterator[str]]]] = []
        if msg.statuses is not None:
            lists = [self._by_status[s] for s in msg.statuses]
            options.append((sum(len(x) for x in lists), lambda: _merge_desc(lists, before)))
        if msg.task_type is not None:
            by_type = self._by_type.get(msg.task_type)
            if by_type is None:
                return iter(())
            options.append((len(by_type), lambda: _desc(by_type, before)))
        if msg.resource_id is not None:
            found = self._by_resource.get(msg.resource_id)
            if found is None:
                return iter(())
            ids = [found] if isinstance(found, str) else found
            options.append((len(ids), lambda: _list_desc(ids, before)))
        if isinstance(msg.owner, str):
            by_owner = self._by_owner.get(msg.owner)
            if by_owner is None:
                return iter(())
            options.append((len(by_owner), lambda: _desc(by_owner, before)))
        if options:
            return min(options, key=lambda o: o[0])[1]()
        if before is None:
            return reversed(self._records.keys())
        return _merge_desc(list(self._by_status.values()), before)

    def _on_wait(
        self, msg: m.Wait, fut: asyncio.Future[Any] | None
    ) -> tuple[TaskRecord | None, bool] | _Deferred:
        rec = self._visible(msg.task_id, msg.owner)
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
            self._push_timer(self._now + msg.timeout, _WAIT, rec.task_id, fut)
        return _DEFERRED

    def _on_release_polls(self, msg: m.ReleasePolls) -> int:
        self._polls_released = True
        polls, self._polls = self._polls, set()
        for task_id, waiters in list(self._waiters.items()):
            for fut in waiters & polls:
                waiters.discard(fut)
                if not fut.done():
                    self._replies.append((fut, None, (self._records.get(task_id), False)))
            if not waiters:
                del self._waiters[task_id]
        return len(polls)

    def _on_unwait(self, msg: m.Unwait) -> None:
        self._polls.discard(msg.fut)
        waiters = self._waiters.get(msg.task_id)
        if waiters is not None:
            waiters.discard(msg.fut)
            if not waiters:
                del self._waiters[msg.task_id]

    def _on_subscribe(self, msg: m.Subscribe) -> TaskRecord | None:
        sub = msg.subscription
        rec = None if sub.task_id is None else self._visible(sub.task_id, sub.owner)
        if self._recent is None:
            self._recent = deque(maxlen=RECENT_EVENTS)
        self._replay(sub)
        sub.since = self._event_seq  # earlier changes are in the reply or the replay
        if sub.task_id is None:
            self._global_subs.append(sub)
            return None
        assert rec is not None
        if rec.status in TERMINAL:
            sub.end()
        else:
            self._task_subs.setdefault(rec.task_id, []).append(sub)
        return rec

    def _replay(self, sub: Subscription) -> None:
        """Push the changes a resuming subscriber missed, if all are still held."""
        after = sub.resume_from
        recent = self._recent
        if after is None or recent is None or not self.boot_seq <= after <= self._event_seq:
            return  # none, or from another boot: the subscriber gets the current state
        if after < self._event_seq and (not recent or recent[0][0] > after + 1):
            return  # some are gone: the subscriber gets the current state instead
        sub.since = after
        for seq, rec in recent:
            # matches() checks the owner; a per-task subscriber was checked by _visible
            wanted = rec.task_id == sub.task_id if sub.task_id is not None else sub.matches(rec)
            if seq > after and wanted:
                sub.push(seq, rec)
        sub.resumed = True

    def _on_unsubscribe(self, msg: m.Unsubscribe) -> None:
        sub = msg.subscription
        sub.end()
        if sub.task_id is None:
            self._global_subs = [s for s in self._global_subs if s is not sub]
            return
        subs = self._task_subs.get(sub.task_id)
        if subs is not None:
            subs[:] = [s for s in subs if s is not sub]
            if not subs:
                del self._task_subs[sub.task_id]

    def _on_stats(self, msg: m.Stats) -> TrackerStats:
        return {
            "counts": {k: v for k, v in self._counts.items() if v},
            "records": len(self._records),
            "active": self._active,
            "mailbox_depth": self._mailbox.qsize(),
            "commands": self.commands,
            "runners": len(self._runners),
            "subscriptions": len(self._global_subs) + sum(map(len, self._task_subs.values())),
            "waiters": sum(map(len, self._waiters.values())),
        }

    def _on_runner_finished(self, msg: m.RunnerFinished) -> None:
        runner = self._runners.get(msg.task_id)
        rec = self._records.get(msg.task_id)
        if runner is None:
            return
        if rec is None or rec.status in TERMINAL:
            # Already recorded (cancelled while pending, or abandoned at shutdown).
            del self._runners[msg.task_id]
            return
        try:
            if msg.outcome is TaskStatus.COMPLETED:
                runner.outcome = (TaskStatus.COMPLETED, msg.value, None)
                self._change(rec, TaskStatus.COMPLETED, result=msg.result)
            elif msg.outcome is TaskStatus.FAILED:
                runner.outcome = (TaskStatus.FAILED, None, msg.exc)
                self._change(rec, TaskStatus.FAILED, error=msg.error)
            elif runner.timed_out:
                text = f"timeout: did not finish within {runner.timeout:g} seconds"
                runner.outcome = (TaskStatus.FAILED, None, TimeoutError(text))
                self._change(rec, TaskStatus.FAILED, error=text)
            else:
                reason = "cancelled: tracker shutting down" if self._draining else "cancelled"
                runner.outcome = (TaskStatus.CANCELLED, None, None)
                self._change(rec, TaskStatus.CANCELLED, error=reason)
        finally:
            self._runners.pop(msg.task_id, None)

    def _on_drain(self, msg: m.Drain) -> dict[str, asyncio.Task[None]]:
        self._draining = True
        self._on_release_polls(m.ReleasePolls())
        return {tid: r.task for tid, r in self._runners.items() if r.task is not None}

    def _on_abandon(self, msg: m.Abandon) -> None:
        for task_id in msg.task_ids:
            runner = self._runners.get(task_id)
            rec = self._records.get(task_id)
            if runner is not None:
                runner.outcome = (TaskStatus.CANCELLED, None, None)
            if rec is not None and rec.status not in TERMINAL:
                self._change(rec, TaskStatus.CANCELLED, error=msg.reason)  # settles it
            self._runners.pop(task_id, None)

    def _on_tick(self, msg: m.Tick) -> None:
        """Nothing to do: the batch that carries a Tick fires due timers first."""

    def _on_stop(self, msg: m.Stop) -> None:
        self._stopping = True


def _spec(
    metadata: Mapping[str, JSON],
    owner: str | None,
    in_process: bool,
    callback_url: str | None,
    heartbeat_timeout: float | None,
) -> TaskSpec:
    if (
        not metadata
        and owner is None
        and not in_process
        and callback_url is None
        and heartbeat_timeout is None
    ):
        return DEFAULT_SPEC
    return TaskSpec(metadata, owner, in_process, callback_url, heartbeat_timeout)


def _desc(ids: SortedList, before: str | None) -> Iterator[str]:
    if before is None:
        rev: Iterator[str] = reversed(ids)
        return rev
    it: Iterator[str] = ids.irange(maximum=before, inclusive=(True, False), reverse=True)
    return it


def _list_desc(ids: list[str], before: str | None) -> Iterator[str]:
    end = len(ids) if before is None else bisect_left(ids, before)
    for i in range(end - 1, -1, -1):
        yield ids[i]


def _merge_desc(lists: list[SortedList], before: str | None) -> Iterator[str]:
    if len(lists) == 1:
        return _desc(lists[0], before)
    return heapq.merge(*(_desc(x, before) for x in lists if x), reverse=True)
