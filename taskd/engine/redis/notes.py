"""``Notes``: the changes a process has in hand, by sharded pub/sub.

Every change is an entry of the change stream (``keys.CHANGES``, kept for replays and
for the event streams that follow every task) and, in the same script call, a note
on two sharded pub/sub channels: the task's (``keys.TASK_NOTES``) and, for a spawned
task, its process's (``keys.PROC_NOTES``). A process follows its own channel from the
start (its runners learn of cancels and outcomes recorded elsewhere) and a task's
channel while it holds a waiter or an event stream of that task, so what it reads
grows with what it serves, not with the number of processes.

No change is missed between a read and the follow: a waiter's record is read only
once Redis confirmed the subscription (``Noted``), so a change after the read comes
as a note. A note sent while the connection is down is gone: after a reconnect every
channel is followed again and ``NotesLost`` tells the engine to read again what it
holds (waiters, runners) and to end per-task event streams (their clients resume
with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from . import keys
from .wire import READ_TIMEOUT, Wire

if TYPE_CHECKING:
    import redis.asyncio

    from .background import RawChange
    from .space import RedisSpace

__all__ = ["OWN", "Noted", "Notes", "NotesLost", "parse_note"]

log = logging.getLogger("taskd")

#: Seconds between attempts to connect again.
RETRY: Final = 0.2


#: What ``Noted`` names, before a shard's base, when that shard's notes connection
#: follows this process's own channel (made when first needed: see ``Following``).
OWN: Final = "@"


@dataclass(frozen=True, slots=True)
class Noted:
    """Redis confirmed that this process follows the task's channel (in shard
    ``base``)."""

    task_id: str
    base: str


@dataclass(frozen=True, slots=True)
class NotesLost:
    """The connection was lost and made again: notes may have been missed. The
    tasks whose channels are confirmed again are ``followed``."""

    followed: frozenset[str]
    base: str


@dataclass(frozen=True, slots=True)
class NotedChanges:
    """Notes received, in order, not decoded yet, from the shard ``base``."""

    entries: tuple[RawChange, ...]
    base: str


def parse_note(text: str) -> RawChange:
    """A note's text (sequence number, task id, status, payload flag, the version's
    JSON, a newline between them) as a change entry. A note carries the whole
    version, payload included (it is not kept, so a delete leaves nothing behind):
    its flag is empty, and a follower reads nothing more."""
    seq, task_id, status, flag, entry = text.split("\n", 4)
    return (int(seq), task_id, status, entry, bool(flag))


class Notes:
    """The process's pub/sub connection to one shard (``base``; on a single Redis,
    the only one): see the module docstring."""

    def __init__(
        self,
        space: RedisSpace,
        proc: str,
        post: Callable[[object], None],
        closed: Callable[[], bool],
        base: str,
    ) -> None:
        self._space = space
        self._post = post
        self._closed = closed
        self.base = base
        self._own = space.key(keys.PROC_NOTES + proc, base)
        self._prefix = space.key(keys.TASK_NOTES, base)
        self._client: redis.asyncio.Redis | None = None
        #: Every channel followed, or asked for (followed again after a reconnect).
        self._channels: set[str] = set()
        # Channels to follow and to leave at the next flush.
        self._follows: list[str] = []
        self._unfollows: list[str] = []
        self._wire: Wire | None = None

    async def open(self) -> None:
        """Connect and follow this process's channel (before any task is spawned)."""
        await self._connect()

    async def _connect(self) -> frozenset[str]:
        # Every channel is followed (and confirmed) before notes are read again, so
        # that a re-read after NotesLost misses nothing.
        client = self._client = await self._space.client(self._own, reader=True)
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        wire = Wire(conn)
        asked = {self._own, *self._channels}
        try:
            for channel in asked:
                wire.send("SSUBSCRIBE", channel)
            waiting = set(asked)
            async with asyncio.timeout(READ_TIMEOUT):
                while waiting:
                    for push in await wire.pushes():
                        if isinstance(push, Exception):  # NOPERM: an ACL without &channels
                            raise ConnectionError(f"cannot follow change notes: {push}")
                        if _kind(push) == "ssubscribe":
                            waiting.discard(push[1])
        except BaseException:
            await conn.disconnect()
            await pool.release(conn)
            raise
        self._wire = wire
        for channel in self._channels - asked:  # asked for while connecting
            wire.send("SSUBSCRIBE", channel)
        n = len(self._prefix)
        return frozenset(c[n:] for c in asked if c.startswith(self._prefix))

    def follow(self, task_id: str) -> None:
        """Follow a task's channel (sent at the next ``flush``); ``Noted`` is posted
        once Redis confirms it."""
        channel = self._prefix + task_id
        self._channels.add(channel)
        self._follows.append(channel)

    def unfollow(self, task_ids: list[str]) -> None:
        """Stop following these tasks' channels (sent at the next ``flush``)."""
        for task_id in task_ids:
            channel = self._prefix + task_id
            self._channels.discard(channel)
            self._unfollows.append(channel)

    def flush(self) -> None:
        """Send what ``follow`` and ``unfollow`` asked for since the last flush, as one
        command each: one write for a whole batch's channels, not one per channel.
        While reconnecting, ``_connect`` follows every channel asked for."""
        wire = self._wire
        if wire is not None:
            if self._unfollows:
                wire.send("SUNSUBSCRIBE", *self._unfollows)
            if self._follows:
                wire.send("SSUBSCRIBE", *self._follows)
        self._follows.clear()
        self._unfollows.clear()

    async def run(self) -> None:
        """Read notes and confirmations, post them in order; reconnect on failure."""
        lost = False
        while True:
            wire = self._wire
            try:
                if wire is None:
                    followed = await self._connect()
                    if lost and not self._closed():
                        self._post(NotesLost(followed, self.base))
                    elif not self._closed():
                        # A first connection (a shard's, made when first needed):
                        # what was held for it goes on.
                        self._post(Noted(OWN + self.base, self.base))
                        for task_id in followed:
                            self._post(Noted(task_id, self.base))
                    lost = False
                    continue
                got = await wire.pushes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not lost:
                    log.warning("the change notes cannot be read: %s", exc)
                lost = True
                await self._drop()
                await asyncio.sleep(RETRY)
                continue
            if self._closed():
                return
            try:
                self._dispatch(got)
            except ConnectionError as exc:
                log.warning("the change notes cannot be read: %s", exc)
                lost = True
                await self._drop()

    def _dispatch(self, got: list[Any]) -> None:
        entries: list[RawChange] = []
        prefix = self._prefix
        for push in got:
            if isinstance(push, Exception):  # a refused SSUBSCRIBE: start again
                raise ConnectionError(f"a change note channel was refused: {push}")
            kind = _kind(push)
            if kind == "smessage":
                entries.append(parse_note(push[2]))
            elif kind == "ssubscribe" and push[1].startswith(prefix):
                if entries:  # in order: the notes before the confirmation first
                    self._post(NotedChanges(tuple(entries), self.base))
                    entries = []
                self._post(Noted(push[1][len(prefix) :], self.base))
        if entries:
            self._post(NotedChanges(tuple(entries), self.base))

    async def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and self._client is not None:
            await wire.conn.disconnect()
            await self._client.connection_pool.release(wire.conn)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._drop()


def _kind(push: object) -> str | None:
    if isinstance(push, list) and len(push) == 3 and isinstance(push[0], str):
        return push[0]
    return None
