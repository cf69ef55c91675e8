"""``RedisEngine``: the records in a shared task space on Redis (or a Redis Cluster).

Redis owns the records (``space``); each process keeps its actor, which owns what is
local to it: its runners, waiters and subscriptions. Every command of a batch that
touches records becomes a plain read or one server-side call, in the shard it
belongs to (``routing``); the batch goes as one pipeline (per master on a cluster),
then each caller is answered. Changes reach this process as notes of what it holds
and, while a subscription follows every task, from the change stream (``follow``).
Deadlines are swept by whichever process gets there first; the script re-checks each
against its record, so each fires once.

When Redis cannot be reached, the batch's callers get ``StoreError`` (503 with
Retry-After) and, for a short back-off, so does every command that needs Redis;
reports from this process's own runners are kept and sent again, so an outcome is
never lost. Liveness: a key with a PX expiry per process (and shard), renewed every
second; a process whose key lapsed is lost, and its running coroutines' records fail
("interrupted: process lost").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..._errors import StoreError, TaskdError, TaskNotFound
from ..._models import ANY_OWNER, JSON, TERMINAL, RawJSON, TaskRecord, TaskStatus
from ..._retention import Retention
from ...actor import messages as m
from ...actor.engine import DEFERRED, Deferred, Engine, Handler, Host, Settle
from ...actor.runner import Runner
from ...actor.timers import Kind
from ..codec import result_text
from . import keys, tally
from .background import BEAT, Background, Writable, announce
from .cluster import Down
from .follow import Following
from .notes import OWN
from .routing import Ended, Router, Traced, settled
from .space import (
    SOCKET_TIMEOUT,
    WRITES,
    Op,
    PolicyError,
    RedisSpace,
    ignore,
    insert_args,
    raise_error,
    refusal,
    scope,
)
from .wire import Unsent

if TYPE_CHECKING:
    from ..._webhooks import WebhookSender

__all__ = ["RedisEngine"]

log = logging.getLogger("taskd")

#: After Redis failed, commands are refused at once for this long before a retry.
BACKOFF: Final = 0.5
_INTERNAL: Final = (m.RunnerFinished, m.Abandon)
_MINE: Final = (keys.ALIVE, keys.SERIES)  # its liveness and its series: gone on exit
#: Messages that need Redis (refused at once while it is unreachable).
_REMOTE: Final = frozenset(
    {m.Create, m.Spawn, m.Start, m.Progress, m.Complete, m.Fail, m.Cancel, m.Delete}
    | {m.DeleteMany, m.Get, m.ListTasks, m.Wait, m.Subscribe, m.Stats}
    | set(_INTERNAL)
)


class RedisEngine(Engine):
    """The records in Redis, behind a process's actor; see the module docstring."""

    shared_replay = True

    def __init__(
        self,
        *,
        retention: Retention,
        cancel_grace: float,
        url: str,
        prefix: str,
        cluster: bool = False,
    ) -> None:
        self.space = RedisSpace(url, prefix, retention, cancel_grace, cluster=cluster)
        self.shards = self.space.shards
        self._retention = retention
        self._cancel_grace = cancel_grace
        #: This process's name in the task space (liveness key, runner ownership).
        self.proc = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        #: The outbox's consumer, when webhooks are configured (``open``).
        self.sender: WebhookSender | None = None
        self._ops: list[Op] = []
        self._down_until = 0.0
        #: Why Redis cannot be reached (None while it can) and why it refuses writes
        #: (None while it takes them): /health reports either (``store_error``).
        self._unreachable: str | None = None
        self._refusing: str | None = None
        # An exception no engine call should raise is logged with its traceback once
        # per kind, not once per batch.
        self._logged: set[type[BaseException]] = set()
        self._held: list[object] = []  # runner reports to send again
        self._acks: list[str] = []
        self._background: list[asyncio.Task[None]] = []
        # When the next sweep is due (inf while one is in flight); when this process's
        # series are next published (with a sweep: ``fire``).
        self._sweep_due = math.inf
        self._publish_due = 0.0

    def bind(self, actor: Host) -> None:
        """Bind to the actor, and make what posts to its mailbox."""
        super().bind(actor)
        a = actor
        self._tasks = Background(
            self.space, self.proc, a.post, lambda: a.closed, lambda: self._refusing is not None
        )
        self.follow = Following(self.space, self.proc, a, self._send, self._tasks)
        self.router = Router(
            self.space, self.proc, self._send, self._send_all, self._tasks, self.follow
        )
        self._at = self.router.at
        self._shards = self.router.shards
        self._register = self.router.register

    def handlers(self) -> Mapping[type[Any], Handler]:
        """The handler of each command that touches records, and of the reader's."""
        return {
            m.Create: self._remote_create,
            m.Spawn: self._remote_spawn,
            m.Start: self._remote_start,
            m.Progress: self._remote_progress,
            m.Complete: self._remote_complete,
            m.Fail: self._remote_fail,
            m.Cancel: self._remote_cancel,
            m.Delete: self._remote_delete,
            m.DeleteMany: lambda msg, fut: self.router.delete_many(msg, fut),
            m.Get: self._remote_get,
            m.ListTasks: self._remote_list,
            m.Wait: self._remote_wait,
            m.Subscribe: self._remote_subscribe,
            m.Stats: self._remote_stats,
            Writable: self._on_writable,
            Ended: self._on_ended,
            Traced: lambda msg, fut: self.router.reread(msg, self._note),
            **self.follow.handlers(),
        }

    # --- opening and the loop ---------------------------------------------------------

    async def open(self, sender: WebhookSender | None) -> None:
        """Connect, load the script, announce this process, and find where the
        change stream stands. Raises ``StoreError`` if Redis cannot be reached."""
        from redis.exceptions import RedisError

        self.sender = sender
        space = self.space
        try:
            await space.check_policy()
            await space.load_script()
            self.page_key = await space.page_key()
            head = await space.call(
                [("GET", (space.key(keys.EPOCH),)), ("GET", (space.key(keys.SEQ),))],
                self.actor.now,
            )
            # (changes after the head reach this process's runners from here on)
            await self.follow.open(int(head[1] or 0))
            await announce(space, self.proc)
        except PolicyError as exc:
            await space.aclose()
            raise StoreError(str(exc)) from None  # (the error table knows StoreError)
        except (RedisError, OSError, StoreError) as exc:
            await space.aclose()
            raise StoreError(f"the shared store (Redis) cannot be reached: {exc}") from None
        # Event ids are global: an id below the space's first one is from an earlier
        # space (a flushed Redis). Replays are read from the stream, not kept here.
        # (On a cluster each shard numbers its own: docs/scale-out.md.)
        self.boot_seq = 0 if self.shards.cluster else int(head[0] or 0)
        self._sweep_at(self.actor.now)

    def start(self) -> None:
        """Start reading the notes, the liveness beat and the outbox."""
        self._background = self._tasks.start(self.sender)
        self.follow.start()
        self.actor.timers.arm()

    async def stop(self) -> None:
        """Stop the background tasks, say this process is gone, disconnect."""
        await self.follow.stop()
        background = self._tasks.tasks
        for task in background:
            task.cancel()
        if background:
            # redis-py can swallow a cancellation that races a socket timeout; the
            # loops check for that (_cancelled), and this wait is bounded regardless.
            await asyncio.wait(background, timeout=SOCKET_TIMEOUT + 3.0)
        with contextlib.suppress(Exception):
            # A clean exit: nothing of ours runs any more.
            space = self.space
            for base in [space.base, *self._tasks.alive_in]:
                mine = [space.key(k + self.proc, base) for k in _MINE]
                await (await space.client(mine[0])).delete(*mine)
        await self.space.aclose()

    def refuses(self, msg: object, fut: asyncio.Future[Any] | None) -> bool:
        """For a short back-off after Redis failed, what needs it is refused at once;
        reports of this process's runners are kept and sent again."""
        if self.actor.now >= self._down_until or type(msg) not in _REMOTE:
            return False
        if fut is not None:
            reason = self.store_error or "unknown"
            fut.set_exception(StoreError(f"the shared store cannot be reached: {reason}"))
        elif isinstance(msg, _INTERNAL):
            self._held.append(msg)
        return True

    def _send(
        self,
        name: str,
        args: Sequence[str],
        done: Callable[[Any], object],
        fut: asyncio.Future[Any] | None,
        retry: object = None,
        on_error: Callable[[], object] | None = None,
        base: str | None = None,
    ) -> Deferred:
        """Queue one server-side call for this batch; ``done`` gets its reply and
        returns the caller's answer (raising answers with the exception);
        ``on_error`` runs instead when the call fails. A script command runs in
        shard ``base`` (the home base where None)."""
        self._ops.append(Op((name, args), done, fut, retry, on_error, base))
        return DEFERRED

    def _send_all(
        self,
        commands: Sequence[tuple[str, Sequence[str]]],
        done: Callable[[list[Any]], object],
        fut: asyncio.Future[Any] | None,
    ) -> Deferred:
        """Queue several calls for this batch; ``done`` gets all their replies (it is
        not called if one fails: the caller gets that failure)."""
        got: list[Any] = []

        def part(reply: Any) -> object:
            got.append(reply)
            return done(got) if len(got) == len(commands) else DEFERRED

        for name, args in commands:
            self._send(name, args, part, fut)
        return DEFERRED

    def _get(
        self,
        task_id: str,
        done: Callable[[str | None], object],
        fut: asyncio.Future[Any] | None,
        base: str | None = None,
    ) -> Deferred:
        """Read a record with a plain GET (reads need no script): ``done`` gets its
        text, or None."""
        return self._send("GET", (self.space.key(keys.RECORD + task_id, base),), done, fut)

    async def commit(self) -> bool:
        """Send the batch's calls as one pipeline, then answer each caller."""
        a = self.actor
        if self._held and a.now >= self._down_until:
            held, self._held = self._held, []
            for msg in held:
                a.dispatch(msg, None)
        # A call's answer may queue the next round trip of its command (a listing's
        # records after its index): sent before the batch's effects go out.
        while self._ops:
            ops, self._ops = self._ops, []
            try:
                replies = await self.space.call(
                    [op.command for op in ops], a.now, [op.base for op in ops]
                )
            except StoreError as exc:
                self._went_down(exc, ops)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Anything else an engine call raises (a redis-py bug, a reply it
                # cannot parse): this batch's callers get 503 and the loop goes on.
                # Left to escape, it ended the actor: every later request 503, and
                # nothing logged.
                self._unexpected(exc, "a batch")
                await self.space.drop()
                self._went_down(StoreError(f"the shared store (Redis) failed: {exc!r}"), ops)
                break
            else:
                down = [r for r in replies if isinstance(r, Down)]
                if down:
                    # One master of a cluster failed: its commands' callers get 503,
                    # runner reports are kept; the others are answered.
                    self._went_down(
                        down[0], [o for o, r in zip(ops, replies, strict=True) if r in down], 0.0
                    )
                elif self._unreachable is not None:
                    log.warning("the shared store (Redis) answers again")
                    self._unreachable = None
                    self._health()
                for op, reply in zip(ops, replies, strict=True):
                    if not isinstance(reply, Down):
                        self._answer(op, reply)
        # Channels nobody here needs any more are left; the stream reader stops when
        # no subscription follows every task.
        self.follow.tidy()
        a.send_replies()
        return True

    def _unexpected(self, exc: BaseException, where: str) -> None:
        if type(exc) not in self._logged:
            self._logged.add(type(exc))
            log.error("the shared store (Redis) failed in %s", where, exc_info=exc)

    def _health(self) -> None:
        self.store_error = self._unreachable or self._refusing

    def _on_writable(self, msg: Writable, fut: object = None) -> None:
        if msg.reason is None:
            if self._refusing is not None:
                log.info("the shared store (Redis) takes writes again")
                self._refusing = None
                self._health()
        elif self._refusing is None:
            why = "the shared store (Redis) refuses writes: %s; writes answer 503 until then"
            log.error(why, msg.reason)
            self._refusing = msg.reason
            self._health()

    def _answer(self, op: Op, reply: Any) -> None:
        fut = op.fut
        if isinstance(reply, Exception) and op.on_error is not None:
            op.on_error()
        try:
            if isinstance(reply, Unsent):
                self._unexpected(reply.cause, f"sending {op.command[0]}")
                raise StoreError(f"the shared store (Redis) could not take a command: {reply}")
            if isinstance(reply, Exception):
                if op.command[0] == "sweep":
                    # (a full Redis refuses the sweep's function outright): try
                    # again later, or no sweep would be due any more
                    self._sweep_at(self.actor.now + BEAT)
                # A command Redis refused (out of memory, read-only replica, …): the
                # store cannot take it, which is a 503, never a 500; one that says
                # Redis refuses writes makes the tracker unhealthy until it takes one.
                why = refusal(reply)
                if why is not None:
                    self._on_writable(Writable(why))
                    raise StoreError(f"the shared store (Redis) refuses writes: {why}")
                raise StoreError(f"the shared store (Redis) refused a command: {reply}")
            if self._refusing is not None and op.command[0] in WRITES:
                self._on_writable(Writable(None))
            if op.command[0].islower() and isinstance(reply, list) and reply[0] == "err":
                raise_error(reply)
            value = op.done(reply)
        except (TaskdError, ValueError, TypeError) as exc:
            if fut is not None:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                log.debug("dropped %s: %s", op.command[0], exc)
        except Exception as exc:
            log.exception("the shared store's %s failed", op.command[0])
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        else:
            if fut is not None and value is not DEFERRED and not fut.done():
                fut.set_result(value)

    def _went_down(self, exc: StoreError, ops: list[Op], backoff: float = BACKOFF) -> None:
        reason = str(exc)
        if self._unreachable is None:
            log.error("%s; refusing commands until it answers", reason)
        self._unreachable = reason
        self._health()
        self._down_until = self.actor.now + backoff
        # Wakes the loop when the back-off ends, so that held runner reports go out.
        self.actor.timers.push(self.actor.now + BACKOFF, Kind.RETRY, "")
        if self._sweep_due == math.inf:  # the sweep in flight failed
            self._sweep_at(self._down_until)
        for op in ops:
            if op.on_error is not None:
                op.on_error()
            if op.fut is not None and not op.fut.done():
                op.fut.set_exception(exc)
            elif op.retry is not None:
                self._held.append(op.retry)

    def fire(self, kind: Kind, task_id: str) -> None:
        """The sweep came due (a retry only wakes the loop: ``commit`` sends what
        was held)."""
        if kind is Kind.SWEEP and self.actor.now >= self._sweep_due:
            # (else a stale entry: a later one is set)
            self._sweep_due = math.inf  # one sweep in flight at a time
            if self.shards.cluster:
                # every shard, each in its own slot; the registry read again first
                # (shards other processes made)
                sweep = functools.partial(self._send, "sweep", (), self._swept, None)
                self._shards(lambda bases: [sweep(base=b) for b in bases], None)
            else:
                self._send("sweep", (), self._swept, None)
            if self.actor.now >= self._publish_due:  # its own series, about once a beat
                self._publish_due = self.actor.now + BEAT / 2
                self._send(*tally.publish(self.space, self.actor.series(self.proc)), ignore, None)

    def fired(self) -> None:
        """Deadlines are swept in Redis: no expiry floor here."""
        self.actor.timers.reset_due(None)

    def latest(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        """A wait ran out, or a long-poll was released: the latest is in Redis."""
        done = lambda text: (self.space.seen(text, ANY_OWNER), False)  # noqa: E731
        self._get(task_id, done, fut, self.shards.of_id(task_id))

    def timed_out(self, task_id: str) -> None:
        """The runner was cancelled for its timeout: the script records cancelling."""
        self._send("timeout", (task_id, self.proc), ignore, None, base=self.shards.of_id(task_id))

    def _swept(self, reply: list[str]) -> None:
        nxt = self.actor.now + BEAT
        if reply[1]:
            nxt = min(nxt, float(reply[1]))
        self._sweep_at(nxt)

    def _sweep_at(self, when: float) -> None:
        if when < self._sweep_due:
            self._sweep_due = when
            self.actor.timers.push(when, Kind.SWEEP, "")

    def _note(self, rec: TaskRecord) -> None:
        """Sweep no later than the deadline this change set (the sweep timer covers
        deadlines other processes set); end the span of a task ended here."""
        if rec.status in TERMINAL:
            if self.actor.tracing is not None:
                self.actor.tracing.ended(rec)
            assert rec.finished_at is not None
            when = rec.finished_at + self._retention.ttl(rec.status)
        elif rec.status is TaskStatus.CANCELLING:
            when = rec.updated_at + self._cancel_grace
        elif rec.heartbeat_timeout is not None:
            when = rec.updated_at + rec.heartbeat_timeout
        else:
            return
        self._sweep_at(when)

    # --- handlers ----------------------------------------------------------------------

    def _record(self, reply: list[Any]) -> TaskRecord:
        rec = self.space.decode(reply[1])[0]
        self._note(rec)
        return rec

    def _remote_create(self, msg: m.Create, fut: asyncio.Future[Any] | None) -> Deferred:
        hb = msg.heartbeat_timeout
        base = self.shards.of_owner(msg.owner)
        self._register(base)
        args = insert_args(
            msg, "" if hb is None else repr(float(hb)), self.shards.random_part(base)
        )
        done: Callable[[list[Any]], TaskRecord] = self._record
        if msg.span is not None:
            done = self.router.traced(msg.span, base, done, self.actor)
        return self._send("create", args, done, fut, base=base)

    def _remote_spawn(self, msg: m.Spawn, fut: asyncio.Future[Any] | None) -> Deferred:
        base = self.shards.of_owner(msg.owner)
        if base != self.space.base:
            # (a cluster) this process follows its channel in the task's shard, and
            # is alive there, before it runs a task there
            if fut is not None and not self.follow.ready(OWN, msg, fut, base):
                return DEFERRED
            self.router.alive_in(base)
        args = (*insert_args(msg, "", self.shards.random_part(base)), self.proc)

        def done(reply: list[Any]) -> TaskRecord:
            return self.actor.add_runner(msg, self.space.decode(reply[1])[0])

        return self._send("spawn", args, done, fut, base=base)

    def _by_id(
        self,
        name: str,
        msg: m.Start | m.Progress | m.Complete | m.Fail | m.Cancel | m.Delete,
        args: tuple[str, ...],
        done: Callable[[Any], object],
        fut: asyncio.Future[Any] | None,
    ) -> Deferred:
        """A script command on one task, in its shard."""
        return self._at(
            msg.task_id,
            msg.owner,
            fut,
            lambda base: self._send(
                name, (msg.task_id, scope(msg.owner), *args), done, fut, base=base
            ),
        )

    def _remote_start(self, msg: m.Start, fut: asyncio.Future[Any] | None) -> Deferred:
        return self._by_id("start", msg, (), self._record, fut)

    def _remote_progress(self, msg: m.Progress, fut: asyncio.Future[Any] | None) -> Deferred:
        args = (
            "" if msg.progress is None else repr(float(msg.progress)),
            "\0" if msg.message is None else msg.message,
            msg.stage or "",
        )
        return self._by_id("progress", msg, args, self._record, fut)

    def _remote_complete(self, msg: m.Complete, fut: asyncio.Future[Any] | None) -> Deferred:
        return self._by_id("complete", msg, (result_text(msg.result),), self._record, fut)

    def _remote_fail(self, msg: m.Fail, fut: asyncio.Future[Any] | None) -> Deferred:
        return self._by_id("fail", msg, (msg.error,), self._record, fut)

    def _remote_cancel(self, msg: m.Cancel, fut: asyncio.Future[Any] | None) -> Deferred:
        # (answered with whether it changed the record: "same" when it did not)
        done = lambda reply: (self._record(reply), reply[0] == "rec")  # noqa: E731
        return self._by_id("cancel", msg, (msg.reason, "1" if msg.confirm else ""), done, fut)

    def _remote_delete(self, msg: m.Delete, fut: asyncio.Future[Any] | None) -> Deferred:
        return self._by_id("delete", msg, (), ignore, fut)

    def _remote_get(self, msg: m.Get, fut: asyncio.Future[Any] | None) -> Deferred:
        done = lambda text: self.space.seen(text, msg.owner)  # noqa: E731
        return self._at(msg.task_id, msg.owner, fut, lambda b: self._get(msg.task_id, done, fut, b))

    def _remote_list(self, msg: m.ListTasks, fut: asyncio.Future[Any] | None) -> Deferred:
        return self.router.list(msg, fut)

    def _remote_wait(self, msg: m.Wait, fut: asyncio.Future[Any] | None) -> Deferred:
        return self._at(msg.task_id, msg.owner, fut, lambda base: self._wait(msg, fut, base))

    def _wait(self, msg: m.Wait, fut: asyncio.Future[Any] | None, base: str) -> Deferred:
        if (
            msg.timeout != 0
            and fut is not None
            and not self.follow.ready(msg.task_id, msg, fut, base)
        ):
            return DEFERRED  # handled again once this process follows the task's notes

        def done(text: str | None) -> object:
            rec = self.space.seen(text, msg.owner)
            if rec is None:
                raise TaskNotFound(msg.task_id)
            return self.actor.wait_on(msg, fut, rec)

        return self._get(msg.task_id, done, fut, base)

    def _remote_subscribe(self, msg: m.Subscribe, fut: asyncio.Future[Any] | None) -> Deferred:
        return self.router.subscribe(msg, fut, self.boot_seq)

    def _remote_stats(self, msg: m.Stats, fut: asyncio.Future[Any] | None) -> Deferred:
        """The deployment's totals and every live process's series (``tally``)."""
        return self._shards(lambda bases: self.router.stats(self.actor, bases, fut), fut)

    def end(
        self,
        runner: Runner,
        status: TaskStatus,
        *,
        result: JSON | RawJSON = None,
        error: str | None = None,
        settle: Settle,
    ) -> None:
        """Record how a runner ended (the script checks it is still this process's);
        a failed send is kept and sent again (``refuses``, ``_went_down``)."""
        args = (runner.task_id, self.proc, status.value, result_text(result), error or "")
        retry = Ended(runner, status, result, error, settle)
        done = functools.partial(self._ended, runner, settle)
        self._send("ended", args, done, None, retry, base=self.shards.of_id(runner.task_id))

    def _on_ended(self, msg: Ended, fut: object) -> None:
        """A runner's end held while Redis was away: send it again."""
        self.end(msg.runner, msg.status, result=msg.result, error=msg.error, settle=msg.settle)

    def _ended(self, runner: Runner, settle: Settle, reply: list[Any]) -> None:
        self.actor.runners.pop(runner.task_id, None)
        rec = settled(runner, settle, reply, self.space.decode)
        if rec is not None:
            self._note(rec)

    def shut(self) -> None:
        """Calls queued but never sent, and messages held for a channel: their
        callers get None (then TrackerClosed for what the actor still holds)."""
        self.follow.shut()
        ops, self._ops = self._ops, []
        for op in ops:
            if op.fut is not None:
                self.actor.replies.append((op.fut, None, None))
