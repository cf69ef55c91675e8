"""``Router``: which shard a command runs in (one on a single Redis; one per owner on
a Redis Cluster, ``shards``), and the commands that span shards: the registry read,
the deployment's stats."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..._errors import TaskdError, TaskNotFound
from ..._models import ANY_OWNER, JSON, OwnerScope, RawJSON, TaskRecord, TaskStatus
from ...actor import messages as m
from ...actor.engine import DEFERRED, Deferred, Host, Settle
from ...actor.runner import Runner
from ..state import Page
from . import keys, tally
from .background import LIVENESS_MS, Background
from .follow import Following, Send
from .pages import Merge, Walk
from .space import RedisSpace, ignore, scope

__all__ = ["Ended", "Router", "Traced", "settled"]


@dataclass(frozen=True, slots=True)
class Traced:
    """The notes of a task whose span this process holds are followed: read it again
    (it may have ended before the follow)."""

    task_id: str
    base: str


@dataclass(frozen=True, slots=True)
class Ended:
    """A runner's end whose call failed, kept to be sent again."""

    runner: Runner
    status: TaskStatus
    result: JSON | RawJSON
    error: str | None
    settle: Settle


class Router:
    """Shards for the engine's commands, queued with its ``send``."""

    __slots__ = ("_background", "_follow", "_proc", "_send", "_send_all", "_shards", "_space")

    def __init__(
        self,
        space: RedisSpace,
        proc: str,
        send: Send,
        send_all: Callable[..., Deferred],
        background: Background,
        follow: Following,
    ) -> None:
        self._space = space
        self._send_all = send_all
        self._shards = space.shards
        self._proc = proc
        self._send = send
        self._background = background
        self._follow = follow

    def at(
        self,
        task_id: str,
        owner: OwnerScope,
        fut: asyncio.Future[Any] | None,
        go: Callable[[str], object],
    ) -> Deferred:
        """Run ``go`` with the shard of a task: its owner's, or, for any owner, the
        one its id names (the registry read first if this process does not know it;
        an id no shard minted is not found)."""
        shards = self._shards
        if owner is not ANY_OWNER:
            go(shards.of_owner(owner))
            return DEFERRED
        base = shards.of_id(task_id)
        if base is not None:
            go(base)
            return DEFERRED

        def known(_: object) -> object:
            found = shards.of_id(task_id)
            if found is None:
                raise TaskNotFound(task_id)
            go(found)
            return DEFERRED

        return self.registry(known, fut)

    def registry(
        self, then: Callable[[object], object], fut: asyncio.Future[Any] | None
    ) -> Deferred:
        """Read the registry of shards (``Shards``), then ``then``; a shard new to
        this process gets its outbox consumed and, while subscriptions follow every
        task, its stream read."""

        def read(reply: list[str] | dict[str, str]) -> object:
            if not isinstance(reply, dict):
                reply = dict(zip(reply[::2], reply[1::2], strict=True))
            before = set(self._shards.registered)
            self._shards.learn(reply)
            for base in self._shards.registered - before:
                self._background.consume(base)
                self._follow.new_shard(base)
            return then(None)

        return self._send("HGETALL", (self._space.key(keys.SHARDS),), read, fut)

    def shards(
        self, then: Callable[[list[str]], object], fut: asyncio.Future[Any] | None
    ) -> Deferred:
        """Run ``then`` with every shard: the home base on a single Redis, every
        registered shard (read now) on a cluster."""
        if not self._shards.cluster:
            then([self._space.base])
            return DEFERRED
        return self.registry(lambda _: then(self._shards.all()), fut)

    def register(self, base: str) -> None:
        """A shard this process writes to goes in the registry, in the batch before
        the call that writes there."""
        shards = self._shards
        if base not in shards.registered:
            shards.registered.add(base)
            args = (self._space.key(keys.SHARDS), shards.code(base), base)

            def failed() -> None:
                shards.registered.discard(base)

            self._send("HSET", args, ignore, None, on_error=failed)
            self._background.consume(base)

    def alive_in(self, base: str) -> None:
        """Before this process's first spawn in a shard: registered, and alive there
        (the shard's sweep reads liveness in its own slot), in the batch before the
        call (the same master, in order); the beat keeps it alive from then on."""
        self.register(base)
        if base not in self._background.alive_in:
            self._background.alive_in.add(base)
            alive = self._space.key(keys.ALIVE + self._proc, base)
            self._send("SET", (alive, "1", "PX", str(LIVENESS_MS)), ignore, None)

    def subscribe(
        self, msg: m.Subscribe, fut: asyncio.Future[Any] | None, boot_seq: int
    ) -> Deferred:
        """``Subscribe`` in the task's shard; to every task, in the owner's shard, or
        (an admin's, on a cluster) in every shard."""
        sub = msg.subscription
        follow = self._follow
        if sub.task_id is not None:
            go = lambda base: follow.subscribe(msg, fut, boot_seq, [base])  # noqa: E731
            return self.at(sub.task_id, sub.owner, fut, go)
        if sub.owner is not ANY_OWNER or not self._shards.cluster:
            base = self._shards.of_owner(None if sub.owner is ANY_OWNER else sub.owner)
            return follow.subscribe(msg, fut, boot_seq, [base])
        return self.shards(lambda bases: follow.subscribe(msg, fut, boot_seq, bases), fut)

    def traced(
        self,
        span: object,
        base: str,
        record: Callable[[list[Any]], TaskRecord],
        actor: Host,
    ) -> Callable[[list[Any]], TaskRecord]:
        """What answers a create with a span: the record, and then the span held and
        the task's notes followed until it ends (another process may end it); once
        Redis confirms the follow, ``Traced`` reads it again (``reread``)."""

        def done(reply: list[Any]) -> TaskRecord:
            rec = record(reply)
            if actor.tracing is not None:
                actor.tracing.opened(span, rec.task_id)
                self._follow.ready(rec.task_id, Traced(rec.task_id, base), None, base)
            return rec

        return done

    def reread(self, msg: Traced, note: Callable[[TaskRecord], None]) -> None:
        """``Traced``: read the task; ``note`` a terminal record (its span ends)."""

        def done(text: str | None) -> None:
            rec = self._space.seen(text, ANY_OWNER)
            if rec is not None and rec.is_terminal:
                note(rec)

        self._send("GET", (self._space.key(keys.RECORD + msg.task_id, msg.base),), done, None)

    def stats(self, actor: Host, bases: list[str], fut: asyncio.Future[Any] | None) -> Deferred:
        """``Stats`` over ``bases``: each shard's counts (one ``MULTI … EXEC`` each),
        added up once all replied (``tally.StatsRead``)."""
        read = tally.StatsRead(self._space, actor, self._proc, bases)
        then = functools.partial(self._send, fut=fut)
        got: list[Any] = [None] * len(bases)
        left = [len(bases)]

        def one(i: int, reply: Any) -> object:
            got[i] = reply
            left[0] -= 1
            return read.done(got, then) if not left[0] else DEFERRED

        for i, commands in enumerate(read.commands()):
            *queued, last = commands  # its series, MULTI, the reads; EXEC answers
            for command in queued:
                self._send(*command, ignore, None)
            self._send(*last, functools.partial(one, i), fut)
        return DEFERRED

    def delete_many(self, msg: m.DeleteMany, fut: asyncio.Future[Any] | None) -> Deferred:
        """``DeleteMany``: the matching terminal tasks found as a listing finds them
        (``pages``), then each deleted with its subtree by the script's ``purge``
        (which checks it is still terminal, the caller's and without an active
        descendant, and skips it if not), all in the next round trip; answered with
        the count of records deleted (subtrees included) and where to go on from."""
        owner = scope(msg.owner)

        def found(page: Page) -> object:
            if not page.records:
                return 0, page.next_cursor
            deleted = [0]
            left = [len(page.records)]

            def one(reply: object) -> object:
                if isinstance(reply, list) and reply[:1] == ["ok"]:
                    deleted[0] += int(reply[1])  # (the task and its subtree)
                left[0] -= 1
                return (deleted[0], page.next_cursor) if not left[0] else DEFERRED

            for rec in page.records:
                base = self._shards.of_id(rec.task_id) or self._space.base
                self._send("purge", (rec.task_id, owner), one, fut, base=base)
            return DEFERRED

        return self.list(msg.listing(), fut, found)

    def list(
        self,
        msg: m.ListTasks,
        fut: asyncio.Future[Any] | None,
        then: Callable[[Page], object] | None = None,
    ) -> Deferred:
        """``ListTasks``: the index, then its records, with plain commands, one round
        trip each (``pages.Walk``), sent in the batches' pipelines; an admin's
        listing on a cluster walks every shard at once (``pages.Merge``)."""
        space = self._space
        if msg.parent_id is not None and msg.owner is ANY_OWNER and self._shards.cluster:
            return self._children(msg, fut, then)
        if msg.owner is not ANY_OWNER or not self._shards.cluster:
            base = self._shards.of_owner(None if msg.owner is ANY_OWNER else msg.owner)
            return self._walk(Walk(msg, lambda s: space.key(s, base), space.decode), fut, then)
        return self.shards(
            lambda bases: self._walk(Merge(msg, bases, space.key, space.decode), fut, then), fut
        )

    def _children(
        self,
        msg: m.ListTasks,
        fut: asyncio.Future[Any] | None,
        then: Callable[[Page], object] | None,
    ) -> Deferred:
        """An admin's listing of a parent's children on a cluster: in the parent's
        shard, the one its id names (a tree shares its owner); an id no shard minted
        has none."""
        space, shards = self._space, self._shards
        parent_id = msg.parent_id
        assert parent_id is not None

        def walk(base: str) -> Deferred:
            return self._walk(Walk(msg, lambda s: space.key(s, base), space.decode), fut, then)

        base = shards.of_id(parent_id)
        if base is not None:
            return walk(base)

        def known(_: object) -> object:
            found = shards.of_id(parent_id)
            if found is not None:
                return walk(found)
            page = Page((), None)
            return page if then is None else then(page)

        return self.registry(known, fut)

    def _walk(
        self,
        walk: Walk | Merge,
        fut: asyncio.Future[Any] | None,
        then: Callable[[Page], object] | None,
    ) -> Deferred:
        def step(replies: list[Any]) -> object:
            nxt = walk.feed(replies)
            if isinstance(nxt, Page):
                return nxt if then is None else then(nxt)
            return self._send_all(nxt, step, fut)

        return self._send_all(walk.start(), step, fut)


def settled(
    runner: Runner,
    settle: Settle,
    reply: list[Any],
    decode: Callable[[str], tuple[TaskRecord, int]],
) -> TaskRecord | None:
    """Settle a runner's handle from the reply to its ``ended`` call; the record."""
    if reply[0] == "rec":
        rec = decode(reply[1])[0]
        runner.outcome.set(*settle, rec)
        return rec
    if reply[0] == "was":
        # Already recorded (cancelled before it ran, or declared lost): the record
        # stands, and the handle says what it says.
        rec = decode(reply[1])[0]
        if rec.status is TaskStatus.COMPLETED:
            runner.outcome.set(*settle, rec)
        elif rec.status is TaskStatus.CANCELLED:
            runner.outcome.set(TaskStatus.CANCELLED, None, None, rec)
        else:
            runner.outcome.set(TaskStatus.FAILED, None, TaskdError(rec.error or "failed"), rec)
        return rec
    runner.outcome.set(TaskStatus.FAILED, None, TaskNotFound(runner.task_id))
    return None
