"""``Tracker``: the handle callers hold. It validates arguments, turns each call into
one message for the actor and awaits the reply; it never touches task state itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import CoroutineType, TracebackType
from typing import Any, Final, TypeVar

from ._args import (
    check_new_owner,
    check_owner,
    check_resource_id,
    check_stage,
    check_task_id,
    check_task_type,
)
from ._checks import check_metadata, check_progress, check_seconds, store_json
from ._counters import HttpCounters
from ._errors import TaskNotFound, TrackerClosed
from ._listing import Listing
from ._models import ANY_OWNER, EMPTY_METADATA, JSON, OwnerScope, TaskRecord
from ._redact import redact_error, redact_message
from ._retention import Retention
from ._tracing import check_traceparent
from ._tracing import make as make_tracing
from ._webhooks import Webhooks, WebhookSender, check_callback
from .actor import messages as m
from .actor.actor import Actor
from .actor.engine import Deferred
from .actor.runner import ContextExecutor, current_parent
from .actor.stats import TrackerStats
from .actor.subscription import Subscription
from .engine.choice import make_engine
from .engine.store import Store
from .handle import TaskHandle, TrackerState, WouldBlock

__all__ = ["Tracker"]

log = logging.getLogger("taskd")
T = TypeVar("T")
R = TypeVar("R")

# After close_timeout, runners are cancelled; this is how long they get to unwind
# before they are recorded cancelled anyway and left behind (with a log line).
CANCEL_GRACE: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Options:
    retention: Retention
    #: The local engine's store (None with Redis: it holds the records).
    store: Store | None
    close_timeout: float


class Tracker(Listing):
    """Tracks background tasks; use as ``async with Tracker() as tracker``.

    Every option is keyword-only and checked here (docs/embedding.md has each one's
    meaning): ``retention``, ``store`` (default ``MemoryStore()``), ``close_timeout``,
    ``cancel_grace``, ``webhooks``, ``clock`` (for tests); ``redis`` (a URL: one task
    space for every tracker given it and ``redis_prefix``) or ``redis_cluster`` (the
    same on a Redis Cluster, sharded by owner), either excluding ``store``. Methods
    called before entry, after close, or once the actor has died raise
    ``TrackerClosed`` at once."""

    def __init__(
        self,
        *,
        retention: Retention | None = None,
        store: Store | None = None,
        close_timeout: float = 5.0,
        cancel_grace: float = 60.0,
        webhooks: Webhooks | None = None,
        clock: Callable[[], float] = time.time,
        redis: str | None = None,
        redis_prefix: str = "taskd:",
        redis_cluster: str | None = None,
    ) -> None:
        if retention is None:
            retention = Retention()
        elif not isinstance(retention, Retention):
            raise TypeError(f"retention must be a taskd.Retention, not {type(retention).__name__}")
        close_after = check_seconds(close_timeout, "close_timeout", allow_zero=True)
        if close_after is None:
            raise TypeError("close_timeout must be a number of seconds")
        grace = check_seconds(cancel_grace, "cancel_grace")
        if grace is None:
            raise TypeError("cancel_grace must be a number of seconds")
        if not callable(clock):
            raise TypeError("clock must be callable")
        if webhooks is not None and not isinstance(webhooks, Webhooks):
            raise TypeError("webhooks must be a taskd.Webhooks")
        self._webhooks = webhooks
        self._clock = clock
        self._sender: WebhookSender | None = None
        engine, store = make_engine(
            retention, store, grace, clock, redis, redis_cluster, redis_prefix
        )
        self._options = _Options(retention, store, close_after)
        self._state = TrackerState.NEW
        self._engine = engine
        self._actor = Actor(mailbox=asyncio.Queue(), engine=engine, clock=clock, cancel_grace=grace)
        self._actor.tracing = self._tracing = make_tracing()
        self._actor_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        # The key page tokens are signed with (docs/scale-out.md): random per tracker in
        # memory; a store that keeps one (SQLite, Redis) replaces it at entry, so every
        # process and restart of a deployment accepts its tokens.
        self._page_key = secrets.token_bytes(32)

    # --- lifecycle ------------------------------------------------------------------

    @property
    def state(self) -> TrackerState:
        """The tracker's lifecycle state (CLOSED as soon as the actor has died)."""
        if self._state is TrackerState.OPEN and self._actor.closed:
            return TrackerState.CLOSED
        return self._state

    @property
    def page_key(self) -> bytes:
        """The deployment's key for signing page tokens (HMAC-SHA256; read-only).
        Kept by the store, so every process and restart of one deployment accepts the
        same tokens (in memory: random per tracker, as its cursors die with it)."""
        return self._page_key

    @property
    def retention(self) -> Retention:
        """The retention policy in force."""
        return self._options.retention

    async def __aenter__(self) -> Tracker:
        if self._state is not TrackerState.NEW:
            raise RuntimeError(f"a Tracker can be entered once; this one is {self.state.value}")
        if self._webhooks is not None:
            self._sender = WebhookSender(self._webhooks)
        await self._actor.open(self._sender)
        if self._engine.page_key:
            self._page_key = self._engine.page_key
        loop = asyncio.get_running_loop()
        ContextExecutor.install(loop)  # run_in_executor keeps a spawned task's context
        task = loop.create_task(self._actor.run(), name="taskd-actor")
        task.add_done_callback(self._actor.task_done)  # fails callers if it never ran
        self._actor_task = task
        self._state = TrackerState.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking commands, let spawned tasks finish (up to ``close_timeout``),
        cancel the rest and record them cancelled, then stop the actor. Idempotent."""
        if self._state is TrackerState.NEW:
            self._state = TrackerState.CLOSED
            await self._close_store()
            return
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        self._state = TrackerState.CLOSING
        try:
            await self._shutdown()
        finally:
            self._state = TrackerState.CLOSED
            try:
                if self._sender is not None:
                    await self._sender.aclose()
                await self._close_store()
            finally:
                self._closing.set_result(None)

    async def _shutdown(self) -> None:
        assert self._actor_task is not None
        await self._actor.shutdown(self._options.close_timeout, CANCEL_GRACE)
        try:
            await self._actor_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            log.exception("the actor had died")

    async def _close_store(self) -> None:
        if self._options.store is not None:
            await self._options.store.close()

    def __repr__(self) -> str:
        where = self._options.store if self._options.store is not None else "redis"
        return f"<Tracker state={self.state.value} store={where!r}>"

    # --- sending --------------------------------------------------------------------

    def _call(self, msg: m.Request[R]) -> asyncio.Future[R]:
        """Send a command if the tracker is open; the future gets the actor's reply.
        Not a coroutine: callers await the future itself (a frame less per request)."""
        if self._state is not TrackerState.OPEN or self._actor.closed:
            raise TrackerClosed(f"the tracker is {self.state.value}; it takes no commands")
        return self._actor.ask(msg)

    # --- creating -------------------------------------------------------------------

    async def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        task_type: str,
        resource_id: str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        owner: str | None = None,
        timeout: float | None = None,
        callback_url: str | None = None,
        parent_id: str | None = None,
    ) -> TaskHandle[T]:
        """Track and run ``coro`` in the background; returns its handle at once.

        The record is ``running`` once the coroutine starts, then ``completed`` with
        its (JSON) return value, ``failed`` with its redacted exception, or
        ``cancelled``. ``timeout`` fails it with ``TimeoutError`` on overrun. Raises
        ``TaskConflict`` while an active task holds (owner, task_type, resource_id)
        and ``TrackerFull`` when the cap is full of active tasks (the coroutine is
        then closed without running). ``parent_id``: the task this one is a child of
        (docs/trees.md); by default, the spawned task this is called in, if it has
        the same owner."""
        try:
            if not isinstance(coro, CoroutineType):  # (inspect.iscoroutine, no call)
                raise TypeError(f"spawn() needs a coroutine, not {type(coro).__name__}")
            done: TaskHandle[T] = TaskHandle(self)  # (also the outcome the actor settles)
            task_type = check_task_type(task_type)
            # (each check passes None through: skipped for None, a call less each)
            if resource_id is not None:
                resource_id = check_resource_id(resource_id)
            metadata = EMPTY_METADATA if metadata is None else check_metadata(metadata)
            if owner is not None:
                owner = check_new_owner(owner)
            if callback_url is not None:
                callback_url = check_callback(self._webhooks, callback_url)
            seconds = None if timeout is None else check_seconds(timeout, "timeout")
            actor = self._actor
            if parent_id is None:
                parent_id = current_parent(actor.post, owner)
            else:
                check_task_id(parent_id)
            trace = (None, None) if self._tracing is None else self._tracing.start(task_type, None)
            if (
                resource_id is None
                and parent_id is None
                and self._state is TrackerState.OPEN
                and actor.admits()
            ):
                # The fast path: no dedup to answer, nothing to commit, and room under
                # the cap whatever the mailbox holds, so the caller builds the record
                # (from the actor's one id sequence) and nothing needs to be awaited.
                # The message is in the mailbox before this returns: any later command
                # of this caller sees the task.
                args = (coro, task_type, metadata, owner, callback_url, seconds, done, trace)
                done._created = actor.spawn_now(*args)
                return done
            ctx = contextvars.copy_context()
            msg = m.Spawn(
                coro, task_type, resource_id, metadata, owner, callback_url, seconds, ctx, done,
                None, trace[1], trace[0], parent_id,
            )  # fmt: skip
            done._created = await self._call(msg)
        except BaseException:
            if inspect.iscoroutine(coro):
                coro.close()  # it will never run; closing it avoids a "never awaited" warning
            raise
        return done

    async def create(
        self,
        task_type: str,
        *,
        resource_id: str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        owner: str | None = None,
        callback_url: str | None = None,
        heartbeat_timeout: float | None = None,
        traceparent: str | None = None,
        parent_id: str | None = None,
        await_children: bool = False,
    ) -> TaskRecord:
        """Register a task run elsewhere (an external worker); it starts ``pending``.
        With ``heartbeat_timeout``, a task with no report (start, progress) for that
        many seconds fails with ``"heartbeat timeout"``. ``traceparent``: the creator's
        W3C trace context, if not the current span's (docs/tracing.md).
        ``parent_id``: the task this one is a child of (same owner; by default the
        spawned task this is called in, if any); ``await_children``: its ``complete``
        leaves it running until its children are terminal (docs/trees.md)."""
        if not isinstance(await_children, bool):
            raise TypeError("await_children must be a bool")
        owner = check_new_owner(owner)
        if parent_id is None:
            parent_id = current_parent(self._actor.post, owner)
        else:
            check_task_id(parent_id)
        args = (
            check_task_type(task_type),
            check_resource_id(resource_id),
            check_metadata(metadata),
            owner,
            check_callback(self._webhooks, callback_url),
            check_seconds(heartbeat_timeout, "heartbeat_timeout"),
        )
        span, tp = None, check_traceparent(traceparent)
        if self._tracing is not None:
            span, tp = self._tracing.start(args[0], tp)
        return await self._call(m.Create(*args, tp, span, parent_id, await_children))

    # --- changing -------------------------------------------------------------------

    async def start(self, task_id: str, *, owner: OwnerScope = ANY_OWNER) -> TaskRecord:
        """Mark an external task ``running`` (from ``pending``)."""
        return await self._call(m.Start(check_task_id(task_id), check_owner(owner)))

    async def progress(
        self,
        task_id: str,
        progress: float | None = None,
        *,
        message: str | None = None,
        owner: OwnerScope = ANY_OWNER,
        stage: str | None = None,
    ) -> TaskRecord:
        """Report progress (0.0–1.0), a message (redacted like an error) and/or a
        ``stage`` (as ``task_type``); None leaves each as it is. The returned record's
        status is ``cancelling`` when cancellation has been requested."""
        tid, fraction, text = check_task_id(task_id), check_progress(progress), message
        msg = m.Progress(
            tid, fraction, redact_message(text), check_owner(owner), check_stage(stage)
        )
        return await self._call(msg)

    async def complete(
        self, task_id: str, result: JSON = None, *, owner: OwnerScope = ANY_OWNER
    ) -> TaskRecord:
        """Mark a running (or cancelling) external task ``completed`` with ``result``."""
        return await self._call(
            m.Complete(check_task_id(task_id), store_json(result, "result"), check_owner(owner))
        )

    async def fail(
        self, task_id: str, error: str | BaseException, *, owner: OwnerScope = ANY_OWNER
    ) -> TaskRecord:
        """Mark an active external task ``failed``; ``error`` is redacted and truncated."""
        return await self._call(
            m.Fail(check_task_id(task_id), redact_error(error), check_owner(owner))
        )

    async def cancel(
        self,
        task_id: str,
        *,
        reason: str = "cancelled",
        owner: OwnerScope = ANY_OWNER,
        confirm: bool = False,
    ) -> TaskRecord:
        """Cancel a task: ``pending`` becomes ``cancelled``; a running task becomes
        ``cancelling`` until its coroutine unwinds, or its worker confirms
        (``confirm=True``: ``cancelled``) or finishes. Idempotent on ``cancelling``
        and ``cancelled``; ``InvalidTransition`` on ``completed`` or ``failed``."""
        return (await self.cancel_changed(task_id, reason=reason, owner=owner, confirm=confirm))[0]

    async def cancel_changed(
        self,
        task_id: str,
        *,
        reason: str = "cancelled",
        owner: OwnerScope = ANY_OWNER,
        confirm: bool = False,
    ) -> tuple[TaskRecord, bool]:
        """``cancel``, and whether it changed the record (HTTP answers 202 or 200)."""
        if not isinstance(confirm, bool):
            raise TypeError("confirm must be a bool")
        msg = m.Cancel(check_task_id(task_id), redact_error(reason), check_owner(owner), confirm)
        return await self._call(msg)

    async def delete(self, task_id: str, *, owner: OwnerScope = ANY_OWNER) -> None:
        """Remove a terminal task; an active one raises ``InvalidTransition``."""
        await self._call(m.Delete(check_task_id(task_id), check_owner(owner)))

    # --- reading --------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: OwnerScope = ANY_OWNER) -> TaskRecord | None:
        """The record, or None if unknown, expired, evicted or another owner's."""
        # The hottest call (every poll): checks inlined for their common case.
        if type(task_id) is not str:
            check_task_id(task_id)
        if owner is not ANY_OWNER:
            owner = check_owner(owner)
        actor = self._actor
        if self._state is TrackerState.OPEN and actor.settled():
            # The read fast path (docs/architecture.md): nothing is queued for the
            # actor, so the state is what it would answer from. Still a suspension
            # point, as every call is, so that a loop of gets cannot starve the loop.
            await asyncio.sleep(0)
            if self._state is TrackerState.OPEN:
                rec = actor.peek(task_id, owner)
                if not isinstance(rec, Deferred):
                    return rec
        return await self._call(m.Get(task_id, owner))

    def get_nowait(self, task_id: str, *, owner: OwnerScope = ANY_OWNER) -> TaskRecord | None:
        """``get`` without suspending, when the answer is at hand: the read fast path
        (docs/architecture.md), for callers that are a task of their own anyway (an
        HTTP handler) and need no suspension point. Raises ``WouldBlock`` when only
        the actor can answer now (a command is queued, a timer is due, the records
        are in SQLite or Redis, or the tracker is not open): then ``await get``."""
        if type(task_id) is not str:
            check_task_id(task_id)
        if owner is not ANY_OWNER and owner is not None:
            owner = check_owner(owner)
        if self._state is TrackerState.OPEN and not self._actor.closed:
            rec = self._engine.peek(task_id, owner)  # (the actor's peek, one call less)
            if not isinstance(rec, Deferred):
                return rec
        raise WouldBlock(task_id)

    def not_found(self, task_id: str) -> TaskNotFound:
        """The ``TaskNotFound`` for ``task_id`` (as the HTTP GET route raises for None),
        with ``hint`` when the id alone shows another process minted it (docs/scale-out.md)."""
        return TaskNotFound(task_id, self._engine.hint(check_task_id(task_id)))

    # --- this process's share (aiojobs' Scheduler: len, active and pending counts) --

    def __len__(self) -> int:
        """Spawned tasks this process runs or is about to run (``active_count`` +
        ``pending_count``), like ``len(aiojobs.Scheduler)``; not the records held
        (those are in ``stats()``, and with Redis in another process's reach too).
        A tracker is truthy whatever its length (see ``__bool__``)."""
        return len(self._actor.runners)

    def __bool__(self) -> bool:
        """Always true: ``if tracker:`` tests for a tracker, not for running tasks."""
        return True

    @property
    def active_count(self) -> int:
        """Spawned tasks of this process whose coroutine has started and not ended."""
        return sum(1 for r in self._actor.runners.values() if r.task is not None)

    @property
    def pending_count(self) -> int:
        """Spawned tasks of this process accepted but not started yet."""
        return sum(1 for r in self._actor.runners.values() if r.task is None)

    @property
    def subscriber_count(self) -> int:
        """Subscriptions open on this tracker (``watch``, SSE streams)."""
        return len(self._actor.hub)

    async def wait(
        self, task_id: str, timeout: float | None = None, *, owner: OwnerScope = ANY_OWNER
    ) -> TaskRecord:
        """The terminal record, as soon as there is one. ``TimeoutError`` after
        ``timeout`` seconds; ``TaskNotFound`` for an unknown id."""
        rec, terminal = await self._wait(task_id, timeout, owner)
        if not terminal:
            raise TimeoutError(f"task {task_id} did not finish within {timeout} seconds")
        return rec

    async def poll(
        self, task_id: str, timeout: float, *, owner: OwnerScope = ANY_OWNER
    ) -> TaskRecord:
        """Long-poll: the terminal record as soon as there is one, else the latest
        record after ``timeout`` seconds (no exception)."""
        rec, _ = await self._wait(task_id, check_seconds(timeout, "timeout"), owner, poll=True)
        return rec

    async def release_polls(self) -> None:
        """Answer every pending ``poll`` with its latest record now, and later ones at
        once: a server calls this as it shuts down, so that long-polls do not hold it
        up. ``wait`` callers are not affected."""
        with contextlib.suppress(TrackerClosed):
            await self._call(m.ReleasePolls())

    async def _wait(
        self, task_id: str, timeout: float | None, owner: OwnerScope, *, poll: bool = False
    ) -> tuple[TaskRecord, bool]:
        timeout = check_seconds(timeout, "timeout", allow_zero=True)
        tid = check_task_id(task_id)
        fut = self._call(m.Wait(tid, check_owner(owner), timeout, poll))
        try:
            reply = await fut
        except asyncio.CancelledError:
            if not self._actor.closed:
                self._actor.post(m.Unwait(tid, fut))
            raise
        rec, terminal = reply
        if rec is None:
            raise self.not_found(tid)
        return rec, terminal

    async def watch(
        self, task_id: str, *, owner: OwnerScope = ANY_OWNER
    ) -> AsyncIterator[TaskRecord]:
        """Yield the task's current record, then each change; ends after the terminal one.

        An async generator: to leave it early, close it (``async with
        contextlib.aclosing(tracker.watch(task_id)) as changes: ...``), which drops the
        subscription at once rather than when the generator is collected."""
        sub = Subscription(task_id=check_task_id(task_id), owner=check_owner(owner))
        current = await self._call(m.Subscribe(sub))
        assert current is not None  # a per-task subscription answers with its record
        try:
            yield current
            while (item := await sub.next()) is not None:
                yield item[1]
        finally:
            if not sub.ended and not self._actor.closed:
                self._actor.post(m.Unsubscribe(sub))

    async def subscribe(self, subscription: Subscription) -> TaskRecord | None:
        """Register a subscription (used by the web layer's event streams)."""
        rec = await self._call(m.Subscribe(subscription))
        assert rec is None or isinstance(rec, TaskRecord)
        return rec

    def unsubscribe(self, subscription: Subscription) -> None:
        """Drop a subscription; safe to call at any time, even after close."""
        if not subscription.ended and not self._actor.closed:
            self._actor.post(m.Unsubscribe(subscription))

    def health(self) -> str | None:
        """Why the tracker cannot take changes (the store cannot write, or it is not
        open), or None when it can. Read without a message, so it answers at once."""
        if self.state is not TrackerState.OPEN:
            return f"the tracker is {self.state.value}"
        return self._engine.store_error

    async def stats(self) -> TrackerStats:
        """Counters for /metrics: records, tasks finished, per-process series."""
        return await self._call(m.Stats())

    @property
    def http(self) -> HttpCounters:
        """HTTP requests of this process and their durations (``taskd.web`` counts them)."""
        return self._actor.http
