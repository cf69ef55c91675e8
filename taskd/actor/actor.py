"""The actor: the one asyncio task that owns a tracker's runtime state.

Everything here runs inside that task, so no lock guards any of it. The loop takes a
batch of messages from the mailbox, fires due timers, hands each message to its
handler (a handler that raises answers its own caller; the loop goes on), lets the
engine commit the batch (group commit), and only then answers callers, settles
handles and starts runners — or, when the engine pipelines its writes (SQLite), goes
on with the next batches and lets those effects out once the engine hands them back
after the write (``answer``, ``release``). If the loop itself dies, ``_shut`` fails
every pending reply with ``TrackerClosed`` so that nothing hangs.

The records are the engine's (``taskd.engine``: in this process, or Redis): the
actor keeps what is this process's whatever the engine — the mailbox, the waiters,
the runners of spawned coroutines, the ``Hub`` of subscriptions, the ``Timers`` —
and calls the engine's handlers and named hooks (``taskd.engine.base``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .._counters import HttpCounters, ProcessSeries, TaskCounters
from .._errors import TaskdError, TrackerClosed
from .._models import JSON, TERMINAL, OwnerScope, TaskRecord, TaskStatus
from ..engine.state import new_spec
from . import messages as m
from .engine import DEFERRED, Deferred, Engine, Settle
from .hub import Hub
from .outcome import Outcome
from .runner import Runner
from .stats import TrackerStats
from .timers import Kind, Timers

if TYPE_CHECKING:
    from .._tracing import Tracing
    from .._webhooks import WebhookSender

__all__ = ["Actor", "MailboxItem"]

log = logging.getLogger("taskd")
R = TypeVar("R")

MAX_BATCH: Final = 512

#: A mailbox item: a message and the future its reply goes to (None: no reply).
#: The future's type is the message's ``Request[R]``; the mailbox holds all kinds.
MailboxItem = tuple[object, "asyncio.Future[Any] | None"]
# A reply waiting for the batch's commit: (future, exception or None, value).
_Reply = tuple["asyncio.Future[Any]", "BaseException | None", object]

_TICK: Final = m.Tick()
_SHUTTING_DOWN: Final = "cancelled: tracker shutting down"


class Actor:
    """Owner of a tracker's runtime state. Only ``run`` and what it calls touch the
    fields; the engine it drives reads and arranges them through the same calls."""

    def __init__(
        self,
        *,
        mailbox: asyncio.Queue[MailboxItem],
        engine: Engine,
        clock: Callable[[], float],
        cancel_grace: float = 60.0,
    ) -> None:
        self.mailbox = mailbox
        self.engine = engine
        self.clock = clock
        self.cancel_grace = cancel_grace
        self.closed = False
        #: The tasks' spans, with OpenTelemetry (``_tracing``; set by the tracker).
        self.tracing: Tracing | None = None
        self.commands = 0
        #: This process's HTTP requests, counted by the web layer (``Tracker.http``).
        self.http = HttpCounters()
        #: The webhook sender, if any (``open``): its counts are this process's.
        self.sender: WebhookSender | None = None
        #: The batch's clock reading (never backwards, so updated_at never is either).
        self.now = 0.0
        self.timers = Timers(clock, self._wake)
        self.hub = Hub(engine.boot_seq)
        self.runners: dict[str, Runner] = {}
        self.waiters: dict[str, set[asyncio.Future[Any]]] = {}
        # The waiters that are long-polls (answered early at shutdown), and whether
        # that has happened (later polls are then answered at once).
        self._polls: set[asyncio.Future[Any]] = set()
        self._polls_released = False
        #: Shutting down: runners that end now are "cancelled: tracker shutting down".
        self.draining = False
        #: ``Stop`` came: the loop ends after this batch.
        self.stopping = False
        # Drain's caller, while the batch that carries it is committed (the runners
        # of spawns committed by then are the ones shutdown waits for).
        self._drain: asyncio.Future[Any] | None = None

        # Per-batch effects, applied after the commit.
        self.replies: list[_Reply] = []
        self.launch: list[Runner] = []
        self.settle: list[tuple[Runner, TaskRecord]] = []

        engine.bind(self)
        self._post = self.post  # (one bound method for every runner, not one per task)
        self._replies_after_commit = engine.replies_after_commit
        # One handler per message class: the engine's for what touches records, the
        # actor's for what is this process's.
        self._handlers: dict[type[Any], Callable[[Any, asyncio.Future[Any] | None], object]] = {
            **engine.handlers(),
            m.Unwait: self._on_unwait,
            m.Unsubscribe: self._on_unsubscribe,
            m.RunnerFinished: self._on_runner_finished,
            m.ReleasePolls: self._on_release_polls,
            m.Drain: self._on_drain,
            m.Abandon: self._on_abandon,
            m.Stop: self._on_stop,
            m.Tick: self._on_tick,
        }

    # --- opening and the loop ---------------------------------------------------------

    async def open(self, sender: WebhookSender | None) -> None:
        """Open the engine (load or connect) before the loop starts."""
        self.tick()
        self.sender = sender
        await self.engine.open(sender)
        # Event ids start at the engine's first sequence number (this boot's instant,
        # or the shared space's epoch): an id below it is from an earlier boot.
        self.hub = Hub(self.engine.boot_seq)
        if self.engine.shared_replay:
            self.hub.shared()

    async def run(self) -> None:
        """The mailbox loop. Returns after ``Stop``; on any exit fails what is pending."""
        queue = self.mailbox
        timers = self.timers
        engine = self.engine
        batch: list[MailboxItem] = []
        handled = True
        try:
            engine.start()
            await self._flush()  # what open() changed (interrupted tasks, purges)
            while not self.stopping:
                first = queue.get_nowait() if not queue.empty() else await queue.get()
                batch = [first]
                handled = False
                while len(batch) < MAX_BATCH and not queue.empty():
                    batch.append(queue.get_nowait())
                if self.tick() >= timers.due:
                    self._fire_timers()
                for msg, fut in batch:
                    self.dispatch(msg, fut)
                handled = True
                self.commands += len(batch)
                await self._flush()
                timers.arm()
        finally:
            timers.cancel()
            if not handled:
                # The loop died between taking a batch and handing it out: put it back,
                # so that _shut fails its callers like any other pending message.
                for item in batch:
                    queue.put_nowait(item)
            try:
                self._shut()
            finally:
                await engine.stop()

    def task_done(self, task: asyncio.Task[None]) -> None:
        """The done callback of the actor's task. A task cancelled before its first step
        never runs ``run``'s ``finally``: fail what is pending here, or callers would wait
        for ever on a tracker that still looks open."""
        if not self.closed:
            self.timers.cancel()
            self._shut()

    def dispatch(self, msg: object, fut: asyncio.Future[Any] | None) -> None:
        """Handle one message: its answer (or error) goes to its caller's future."""
        engine = self.engine
        if engine.store_error is not None and engine.refuses(msg, fut):
            return
        try:
            value = self._handlers[type(msg)](msg, fut)
        except Exception as exc:
            self.fail(fut, exc, type(msg).__name__)
        else:
            if fut is not None and value is not DEFERRED:
                if self._replies_after_commit:
                    self.replies.append((fut, None, value))
                elif not fut.done():
                    # Nothing to commit first: answer now, skip the reply list.
                    fut.set_result(value)

    def fail(self, fut: asyncio.Future[Any] | None, exc: Exception, what: str) -> None:
        """A command failed: a refusal (``TaskdError``, a bad argument) answers its
        caller; anything else is a bug, logged, and answers too: the loop goes on."""
        if not isinstance(exc, (TaskdError, ValueError, TypeError)):
            log.error("handler for %s raised", what, exc_info=exc)
        if fut is not None:
            self.replies.append((fut, exc, None))  # answered with the batch
        elif isinstance(exc, (TaskdError, ValueError, TypeError)):
            log.debug("dropped %s: %s", what, exc)

    async def _flush(self) -> None:
        """Let the engine commit the batch, then let its effects out (group commit)."""
        if await self.engine.commit():
            self._after_commit()
        if self._drain is not None:
            # Draining, the engine commits each batch before ``commit`` returns: every
            # spawn it accepted has its runner started now.
            fut, self._drain = self._drain, None
            if not fut.done():
                fut.set_result(self._live_runners())

    def send_replies(self) -> None:
        """Answer the callers whose replies waited for the commit."""
        replies, self.replies = self.replies, []
        if replies:
            self.answer(replies)

    def answer(self, replies: list[_Reply]) -> None:
        """Answer replies an engine kept for a commit of its own (a pipelined one)."""
        for fut, error, value in replies:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)

    def release(self, settle: list[tuple[Runner, TaskRecord]], launch: list[Runner]) -> None:
        """What ``_after_commit`` does, for the effects an engine kept for a commit of
        its own (a pipelined one, which ends after later batches were handled): a
        runner closed meanwhile (cancelled) is not started, one whose timeout passed
        meanwhile is cancelled as it starts."""
        for runner, rec in settle:
            if runner.settle_with is not None:
                runner.outcome.set(*runner.settle_with, rec)
        for runner in launch:
            if runner.coro is not None:
                runner.start()
                if runner.timed_out and runner.task is not None:
                    runner.task.cancel()

    def _after_commit(self) -> None:
        """Settle the outcomes of runners whose record is terminal, start new ones."""
        if self.settle:
            settle, self.settle = self.settle, []
            for runner, rec in settle:
                if runner.settle_with is not None:
                    runner.outcome.set(*runner.settle_with, rec)
        if self.launch:
            self._start_runners()

    def _start_runners(self) -> None:
        launch, self.launch = self.launch, []
        for runner in launch:
            runner.start()

    def ask(self, msg: m.Request[R]) -> asyncio.Future[R]:
        """Send a command; the future gets its reply (``TrackerClosed`` once the loop
        has ended). Not a coroutine: callers await the future directly."""
        if self.closed:
            raise TrackerClosed("the tracker is closed")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.mailbox.put_nowait((msg, fut))
        return fut

    async def shutdown(self, close_timeout: float, unwind: float) -> None:
        """Drain (no new commands), give the runners ``close_timeout`` seconds, cancel
        the rest, give them ``unwind`` more, record what ignored cancellation as
        cancelled (and leave it), then stop the loop. Called by the tracker."""
        try:
            runners = await self.ask(m.Drain())
        except TrackerClosed:
            runners = {}
        if runners:
            if close_timeout > 0:
                _, pending = await asyncio.wait(runners.values(), timeout=close_timeout)
            else:  # no time to finish: cancel at once
                pending = {t for t in runners.values() if not t.done()}
            for task in pending:
                task.cancel()
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=unwind)
                if stuck:
                    ids = tuple(tid for tid, t in runners.items() if t in stuck)
                    log.warning(
                        "%d spawned task(s) ignored cancellation for %.1fs after "
                        "close_timeout; recording them cancelled and leaving them: %s",
                        len(ids),
                        unwind,
                        ", ".join(ids),
                    )
                    with contextlib.suppress(TrackerClosed):
                        await self.ask(
                            m.Abandon(ids, "cancelled: ignored cancellation at shutdown")
                        )
        with contextlib.suppress(TrackerClosed):
            await self.ask(m.Stop())

    def post(self, msg: object) -> None:
        """Queue a fire-and-forget message (runner reports, report_progress)."""
        if self.closed:
            raise TrackerClosed("the tracker is closed")
        self.mailbox.put_nowait((msg, None))

    def wake_waiters(self, rec: TaskRecord) -> None:
        """Answer everyone waiting for this (terminal) record."""
        waiters = self.waiters.pop(rec.task_id, None)
        if waiters:
            if self._polls:
                self._polls.difference_update(waiters)
            for w in waiters:
                if not w.done():
                    w.set_result((rec, True))

    def _shut(self) -> None:
        """Fail every pending reply, waiter and handle; end every subscription."""
        self.closed = True
        self.engine.shut()
        closed = TrackerClosed("the tracker is closed")
        pending = [fut for fut, _, _ in self.replies]
        if self._drain is not None:
            pending.append(self._drain)
        while not self.mailbox.empty():
            msg, fut = self.mailbox.get_nowait()
            if fut is not None:
                pending.append(fut)
            elif type(msg) is m.Spawn:  # a fast-path spawn: its handle waits on done
                msg.coro.close()
                msg.done.set(TaskStatus.FAILED, None, closed)
        for waiters in self.waiters.values():
            pending.extend(waiters)
        for runner in self.runners.values():
            runner.outcome.set(TaskStatus.FAILED, None, closed)
            if runner.task is None:
                runner.close()  # never started: its spawn was not committed
            elif not runner.task.done():
                runner.task.cancel()
        for fut in pending:
            if not fut.done():
                fut.set_exception(closed)
        self.hub.close()
        self.replies.clear()
        self.waiters.clear()

    # --- time and timers ------------------------------------------------------------

    def tick(self) -> float:
        """Read the clock for this batch; never backwards."""
        now = self.clock()
        if now > self.now:
            self.now = now
        return self.now

    def _wake(self) -> None:
        if not self.closed:
            self.mailbox.put_nowait((_TICK, None))

    def _fire_timers(self) -> None:
        engine = self.engine
        for kind, task_id, fut in self.timers.pop_due(self.now):
            if kind is Kind.WAIT:
                assert fut is not None
                if self._unpark(task_id, fut):
                    engine.latest(task_id, fut)
            elif kind is Kind.TIMEOUT:
                runner = self.runners.get(task_id)
                if runner is not None and not runner.timed_out:
                    runner.timed_out = True
                    if runner.task is not None:
                        runner.task.cancel()
                    # (else its spawn is still being committed: cancelled as it starts)
                    engine.timed_out(task_id)
            else:
                engine.fire(kind, task_id)
        engine.fired()

    # --- runners ----------------------------------------------------------------------

    def add_runner(self, msg: m.Spawn, rec: TaskRecord) -> TaskRecord:
        """Book the runner of a spawned record; it starts once the batch is committed."""
        runner = Runner(
            self._post, rec.task_id, msg.coro, msg.context, msg.done, msg.timeout, rec.owner
        )
        self.runners[rec.task_id] = runner
        if msg.span is not None and self.tracing is not None:
            self.tracing.opened(msg.span, rec.task_id)
        self.launch.append(runner)
        if msg.timeout is not None:
            self.timers.push(self.now + msg.timeout, Kind.TIMEOUT, rec.task_id)
        return rec

    def _on_runner_finished(self, msg: m.RunnerFinished, fut: object) -> None:
        runner = self.runners.get(msg.task_id)
        if runner is None:
            return
        settle: Settle
        status: TaskStatus
        if msg.outcome is TaskStatus.COMPLETED:
            status, error, settle = msg.outcome, None, (msg.outcome, msg.value, None)
        elif msg.outcome is TaskStatus.FAILED:
            status, error, settle = msg.outcome, msg.error, (msg.outcome, None, msg.exc)
        elif runner.timed_out:
            error = f"timeout: did not finish within {runner.timeout:g} seconds"
            status, settle = TaskStatus.FAILED, (TaskStatus.FAILED, None, TimeoutError(error))
        else:
            error = _SHUTTING_DOWN if self.draining else "cancelled"
            status, settle = TaskStatus.CANCELLED, (TaskStatus.CANCELLED, None, None)
        self.engine.end(runner, status, result=msg.result, error=error, settle=settle)

    def _on_abandon(self, msg: m.Abandon, fut: object) -> None:
        for task_id in msg.task_ids:
            runner = self.runners.get(task_id)
            if runner is not None:
                cancelled: Settle = (TaskStatus.CANCELLED, None, None)
                self.engine.end(runner, TaskStatus.CANCELLED, error=msg.reason, settle=cancelled)

    # --- the fast paths (called by the tracker, between the actor's batches) ----------

    def admits(self) -> bool:
        """Whether a spawn without resource_id may skip the reply (the engine says
        when: docs/architecture.md, the fast path)."""
        return not self.draining and not self.closed and self.engine.admits()

    def settled(self) -> bool:
        """Whether a read may skip the mailbox now (the read fast path)."""
        return not self.closed and self.engine.settled()

    def peek(self, task_id: str, owner: OwnerScope) -> TaskRecord | Deferred | None:
        """The record as a ``Get`` would answer it now, or ``DEFERRED`` when only
        the actor may answer (see ``settled``)."""
        return DEFERRED if self.closed else self.engine.peek(task_id, owner)

    def spawn_now(
        self,
        coro: Coroutine[Any, Any, Any],
        task_type: str,
        metadata: Mapping[str, JSON],
        owner: str | None,
        callback_url: str | None,
        timeout: float | None,
        done: Outcome[Any],
        trace: tuple[object, str | None] = (None, None),
    ) -> TaskRecord:
        """The spawn fast path (``admits`` said yes): the record is built here, from
        the engine's one id sequence, and the spawn posted; nothing to await. The
        message is in the mailbox before this returns: any later command of this
        caller sees the task."""
        task_id, at = self.engine.mint(self.clock())
        span, tp = trace
        spec = new_spec(metadata, owner, True, callback_url, None, tp)
        rec = TaskRecord(task_id, task_type, TaskStatus.RUNNING, None, at, at, at, spec=spec)
        ctx = contextvars.copy_context()
        msg = m.Spawn(
            coro, task_type, None, metadata, owner, callback_url, timeout, ctx, done, rec, tp, span
        )
        self.mailbox.put_nowait((msg, None))
        return rec

    # --- waiters ----------------------------------------------------------------------

    def wait_on(
        self, msg: m.Wait, fut: asyncio.Future[Any] | None, rec: TaskRecord
    ) -> tuple[TaskRecord | None, bool] | Deferred:
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
        waiters = self.waiters.get(rec.task_id)
        if waiters is None:
            waiters = self.waiters[rec.task_id] = set()
        waiters.add(fut)
        if msg.timeout is not None:
            self.timers.push(self.now + msg.timeout, Kind.WAIT, rec.task_id, fut)
        return DEFERRED

    def _unpark(self, task_id: str, fut: asyncio.Future[Any]) -> bool:
        """A wait's deadline passed: forget its future; True if it still needs an answer."""
        waiters = self.waiters.get(task_id)
        if waiters is not None:
            waiters.discard(fut)
        self._polls.discard(fut)
        return not fut.done()

    def _on_release_polls(self, msg: object, fut: object) -> int:
        self._polls_released = True
        polls, self._polls = self._polls, set()
        for task_id, waiters in list(self.waiters.items()):
            for w in waiters & polls:
                waiters.discard(w)
                if not w.done():
                    # A long-poll released at shutdown gets the latest record.
                    self.engine.latest(task_id, w)
            if not waiters:
                del self.waiters[task_id]
        return len(polls)

    def _on_unwait(self, msg: m.Unwait, fut: object) -> None:
        self._polls.discard(msg.fut)
        waiters = self.waiters.get(msg.task_id)
        if waiters is not None:
            waiters.discard(msg.fut)
            if not waiters:
                del self.waiters[msg.task_id]

    def _on_unsubscribe(self, msg: m.Unsubscribe, fut: object) -> None:
        self.hub.unsubscribe(msg.subscription)

    def stats(
        self,
        counts: dict[tuple[str, TaskStatus], int],
        records: int,
        active: int,
        finished: TaskCounters,
        processes: list[ProcessSeries] | None = None,
    ) -> TrackerStats:
        """``Stats``' answer: the engine's counts and this process's own. An engine
        that shares its records passes every process's series, this one's first;
        otherwise this process's alone, unlabelled."""
        if not processes:
            processes = [self.series()]
        mine = processes[0]
        out: TrackerStats = {
            "counts": counts,
            "records": records,
            "active": active,
            "mailbox_depth": mine.mailbox_depth,
            "commands": mine.commands,
            "runners": len(self.runners),
            "subscriptions": mine.subscriptions,
            "waiters": mine.waiters,
            "finished": finished,
            "processes": processes,
        }
        if mine.webhooks is not None:
            out["webhooks_delivered"], out["webhooks_failed"] = mine.webhooks
        return out

    def series(self, process: str | None = None) -> ProcessSeries:
        """The series of this process now (``process``: its name, when it has one)."""
        http = self.http
        sender = self.sender
        return ProcessSeries(
            process,
            self.mailbox.qsize(),
            len(self.hub),
            sum(map(len, self.waiters.values())),
            self.commands,
            None if sender is None else (sender.delivered, sender.failed),
            dict(http.counts),
            {key: h.copy() for key, h in http.durations.items()},
            self.timers.lag,
        )

    # --- shutdown ---------------------------------------------------------------------

    def _on_drain(
        self, msg: object, fut: asyncio.Future[Any] | None
    ) -> dict[str, asyncio.Task[None]] | Deferred:
        self.draining = True
        if self.launch and not self._replies_after_commit:
            # Spawns of this very batch (the fast path: their callers already hold
            # handles) start now, so that shutdown waits for them like the others.
            self._start_runners()
        self._on_release_polls(msg, None)
        if self._replies_after_commit and fut is not None:
            # Spawns accepted before it may still be committing (a pipelined commit):
            # answered once this batch is committed and their runners started.
            self._drain = fut
            return DEFERRED
        return self._live_runners()

    def _live_runners(self) -> dict[str, asyncio.Task[None]]:
        return {tid: r.task for tid, r in self.runners.items() if r.task is not None}

    def _on_tick(self, msg: object, fut: object) -> None:
        """Nothing to do: the batch that carries a Tick fires due timers first."""

    def _on_stop(self, msg: object, fut: object) -> None:
        self.stopping = True
