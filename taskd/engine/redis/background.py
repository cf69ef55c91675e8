"""The Redis engine's background tasks: the change stream's reader, the liveness
beat, and the webhook outbox's consumer. They talk to the actor only by posting
messages (``Changes``, ``Resync``, ``Writable``) to its mailbox."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..._errors import TaskdError
from ..._models import TERMINAL, TaskRecord, TaskStatus
from ...actor.engine import Host
from ..codec import PAYLOAD
from . import keys
from .space import ChangeReader, RedisSpace, decode_record, refusal

if TYPE_CHECKING:
    from ..._webhooks import WebhookSender

__all__ = [
    "BEAT",
    "Background",
    "Changes",
    "RawChange",
    "Resync",
    "Writable",
    "announce",
    "fan_out",
    "wanted",
]

log = logging.getLogger("taskd")

#: Liveness: a process's key lives this long (ms) and is renewed every BEAT seconds.
LIVENESS_MS: Final = 5000
BEAT: Final = 1.0
#: Outbox entries a dead or stuck process held are taken over after this long (ms).
CLAIM_IDLE_MS: Final = 30_000
_TERMINAL_TEXT: Final = frozenset(s.value for s in TERMINAL)

#: A change stream entry as read: (sequence number, task id, status, the version's
#: JSON without its payload, whether it had a payload: metadata, result or error,
#: which only the record holds).
RawChange = tuple[int, str, str, str, bool]


@dataclass(frozen=True, slots=True)
class Changes:
    """Entries of the change stream, from the reader, not decoded yet; ``reader``
    says which start of the reader read them (a stopped reader's are dropped)."""

    entries: tuple[RawChange, ...]
    reader: int
    #: The shard whose stream they are from.
    base: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The reader lost entries (Redis was away, or it fell behind the stream's length)."""

    reader: int


@dataclass(frozen=True, slots=True)
class Writable:
    """Redis took a write again (the liveness beat), or refused one: ``reason``."""

    reason: str | None


async def announce(space: RedisSpace, proc: str, bases: Iterable[str] = ()) -> None:
    """Say this process is alive (a key with a PX expiry) and one of the space's; on
    a cluster, alive in every shard it ran a spawned task in too (``bases``: a
    shard's sweep reads only its own keys)."""
    home = space.base
    for base in dict.fromkeys([home, *bases]):
        alive = space.key(keys.ALIVE + proc, base)
        pipe = (await space.client(alive)).pipeline(transaction=False)
        pipe.set(alive, "1", px=LIVENESS_MS)
        if base == home:
            pipe.sadd(space.key(keys.PROCS), proc)
        await pipe.execute()


class Background:
    """The background tasks of one process's Redis engine."""

    def __init__(
        self,
        space: RedisSpace,
        proc: str,
        post: Callable[[object], None],
        closed: Callable[[], bool],
        refusing: Callable[[], bool],
    ) -> None:
        self.space = space
        self.proc = proc
        self._post = post
        self._closed = closed
        self._refusing = refusing
        #: The shards this process ran a spawned task in (besides the home base).
        self.alive_in: set[str] = set()
        self._sender: WebhookSender | None = None
        #: The running tasks: the beat, and an outbox consumer per shard.
        self.tasks: list[asyncio.Task[None]] = []
        self._outboxes: set[str] = set()

    def start(self, sender: WebhookSender | None) -> list[asyncio.Task[None]]:
        """Start the beat and, with webhooks, the home shard's outbox."""
        self._sender = sender
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._keep_alive(), name="taskd-liveness"))
        self.consume(self.space.base)
        return self.tasks

    def consume(self, base: str) -> None:
        """With webhooks, consume a shard's outbox (once per shard)."""
        sender = self._sender
        if sender is not None and base not in self._outboxes:
            self._outboxes.add(base)
            task = asyncio.get_running_loop().create_task(
                self._outbox(sender, base), name="taskd-outbox"
            )
            self.tasks.append(task)

    async def _keep_alive(self) -> None:
        # The beat is a write (SET … PX): it also finds a Redis that refuses writes
        # when no caller writes, and finds when it takes them again.
        while True:
            await asyncio.sleep(BEAT)
            try:
                await announce(self.space, self.proc, self.alive_in)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _cancelled()
                why = refusal(exc)
                if why is not None and not self._refusing() and not self._closed():
                    self._post(Writable(why))
                log.debug("liveness beat failed: %s", exc)
            else:
                if self._refusing() and not self._closed():
                    self._post(Writable(None))

    def read_changes(self, last: int, reader: int, base: str) -> asyncio.Task[None]:
        """Start reading a shard's change stream after ``last`` (while an event
        stream here follows every task; ``reader`` numbers this start)."""
        return asyncio.get_running_loop().create_task(
            self._read_changes(last, reader, base), name="taskd-changes"
        )

    async def _read_changes(self, last: int, reader: int, base: str) -> None:
        """Read the change stream from ``last``, post it to the mailbox in order.
        After a failure, ask for a resync (Celery #5919's lesson: what changed while
        the connection was down must be re-read)."""
        stream = ChangeReader(self.space, base)
        try:
            await self._read_from(stream, last, reader, base)
        finally:
            await stream.aclose()

    async def _read_from(self, stream: ChangeReader, last: int, reader: int, base: str) -> None:
        broken = False
        while True:
            try:
                read = await stream.read(last, 512, 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _cancelled()
                if not broken:
                    log.warning("the change stream cannot be read: %s", exc)
                broken = True
                await asyncio.sleep(0.2)
                continue
            # redis-py can swallow a cancel and return normally from the blocked read:
            # without this check the reader would run on until the join timeout
            _cancelled()
            if broken and not self._closed():
                broken = False
                self._post(Resync(reader))
            if not read:
                continue
            entries: list[RawChange] = []
            for eid, flat in read:
                f = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                if keys.ENTRY_RECORD in f:
                    entries.append(
                        (
                            int(eid.partition("-")[0]),
                            f[keys.ENTRY_ID],
                            f[keys.ENTRY_STATUS],
                            f[keys.ENTRY_RECORD],
                            keys.ENTRY_PAYLOAD in f,
                        )
                    )
            if not entries:
                continue
            if self._closed():
                return  # the actor stopped while this read was in flight
            if last and entries[0][0] > last + 1:
                log.warning("missed %d change(s) on the stream", entries[0][0] - last - 1)
                self._post(Resync(reader))
            last = entries[-1][0]
            self._post(Changes(tuple(entries), reader, base))

    async def _outbox(self, sender: WebhookSender, base: str) -> None:
        """Consume a shard's webhook outbox (a consumer group: each entry goes to one
        live process; one a dead process held is claimed after CLAIM_IDLE_MS)."""
        from redis.exceptions import ResponseError

        space = self.space
        key = space.key(keys.OUTBOX, base)
        loop = asyncio.get_running_loop()
        claim_at = 0.0
        acked: list[str] = []
        while True:
            try:
                redis = await space.client(key)
                r = await space.client(key, reader=True)
                with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                    await redis.xgroup_create(key, keys.GROUP, id="0", mkstream=True)
                while True:
                    if acked:
                        # (in place: the senders' callbacks hold this list)
                        acks = acked[:]
                        acked.clear()
                        await redis.xack(key, keys.GROUP, *acks)
                        await redis.xdel(key, *acks)
                    entries: list[tuple[str, dict[str, str]]] = []
                    if loop.time() >= claim_at:
                        claim_at = loop.time() + 10.0
                        claimed: Any = await redis.xautoclaim(
                            key, keys.GROUP, self.proc, CLAIM_IDLE_MS, "0-0", count=32
                        )
                        entries.extend(claimed[1])
                    resp2: Any = await r.xreadgroup(
                        keys.GROUP, self.proc, {key: ">"}, count=32, block=1000
                    )
                    if resp2:
                        entries.extend(resp2[0][1])
                    for eid, fields in entries:
                        if not fields:
                            acked.append(eid)
                            continue
                        rec = space.decode(fields[keys.ENTRY_RECORD])[0]
                        sender.submit(rec, done=functools.partial(acked.append, eid))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _cancelled()
                log.debug("webhook outbox: %s", exc)
                await asyncio.sleep(0.5)


def _cancelled() -> None:
    """Raise CancelledError if this task was asked to stop and a library swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def wanted(a: Host, entry: RawChange, tasks: bool) -> bool:
    """Whether someone in this process follows this change with its payload: from
    the notes (``tasks``), a per-task subscription, a waiter or this process's runner
    (terminal changes); from the stream, a subscription to every task."""
    if not tasks:
        return a.hub.follows_all
    task_id = entry[1]
    return (
        a.hub.follows(task_id)
        or (entry[2] in _TERMINAL_TEXT and (task_id in a.waiters or task_id in a.runners))
        or (a.tracing is not None and a.tracing.holds(task_id))
    )


def fan_out(
    a: Host,
    decode: Callable[[str], tuple[TaskRecord, int]],
    entries: Sequence[RawChange],
    applied: int,
    records: Mapping[str, str],
    tasks: bool,
) -> int:
    """Hand change entries after ``applied`` to this process. From the notes
    (``tasks``): publish them to per-task subscriptions, wake waiters, and stop or
    settle this process's runners that another process cancelled or declared lost.
    From the stream: publish them to the subscriptions that follow every task.
    ``records`` are the current texts of the records whose payload was read for the
    entries (``wanted``); an entry without one is published as it is. Returns the
    last sequence number applied."""
    hub = a.hub
    waiters = a.waiters
    runners = a.runners
    tracing = a.tracing
    fresh: list[tuple[int, TaskRecord]] = []
    for entry in entries:
        seq, task_id, status, text, payload = entry
        if seq <= applied:
            continue
        applied = seq
        if not tasks or (
            task_id in runners
            or hub.follows(task_id)
            or (
                status in _TERMINAL_TEXT
                and (task_id in waiters or (tracing is not None and tracing.holds(task_id)))
            )
        ):
            current = records.get(task_id) if payload else None
            if current is None:
                # No payload, or its record was deleted before it was read: the
                # version as it is (followers never see deleted data). Cached: the
                # same text is what a GET of an unchanged record returns.
                rec = decode(text)[0]
            else:
                # Metadata never changes; a result or error is final once terminal.
                fields = json.loads(current)
                extra = {PAYLOAD[0]: fields.get(PAYLOAD[0])}
                if status in _TERMINAL_TEXT:
                    extra[PAYLOAD[1]] = fields.get(PAYLOAD[1])
                    extra[PAYLOAD[2]] = fields.get(PAYLOAD[2])
                rec = decode_record(text, {f: v for f, v in extra.items() if v is not None})[0]
            fresh.append((seq, rec))
    if not fresh:
        return applied
    if not tasks:
        hub.publish(fresh, None, tasks=False)
        return applied
    # Webhooks go through the outbox, not from here: one delivery per change,
    # whichever process made it.
    hub.publish(fresh, a.wake_waiters, everything=False)
    for _, rec in fresh:
        if tracing is not None and rec.status in TERMINAL:
            tracing.ended(rec)  # (a task this process created, ended elsewhere)
        runner = runners.get(rec.task_id)
        if runner is None:
            continue
        task = runner.task
        if rec.status is TaskStatus.CANCELLING and task is not None and not task.done():
            task.cancel()  # a cancel from any process reaches the coroutine here
        elif rec.status in TERMINAL:
            # Recorded by someone else (cancel grace, or this process was declared
            # lost while paused): the record stands; the coroutine stops.
            del runners[rec.task_id]
            if task is not None and not task.done():
                task.cancel()
            if rec.status is TaskStatus.CANCELLED:
                runner.outcome.set(TaskStatus.CANCELLED, None, None, rec)
            else:
                runner.outcome.set(TaskStatus.FAILED, None, TaskdError(rec.error or "failed"), rec)
    return applied


class Feed:
    """One source of changes (the notes, or the stream), fanned out in order.

    An entry leaves out its record's payload (metadata, result, error): for the
    entries someone here follows it is read from the records first (``fetch``: one
    ``MGET`` in the actor's batch), so that a process reads the payloads of what it
    has in hand only. Entries that arrive meanwhile wait behind, in order."""

    __slots__ = ("_decode", "_fetch", "_fetching", "_inbox", "_tasks", "a", "applied", "received")

    def __init__(
        self,
        a: Host,
        decode: Callable[[str], tuple[TaskRecord, int]],
        fetch: Callable[[list[str], Callable[[list[str | None] | None], None]], None],
        *,
        tasks: bool,
    ) -> None:
        self.a = a
        self._decode = decode
        self._fetch = fetch
        self._tasks = tasks
        #: The latest sequence number fanned out, and the latest read.
        self.applied = 0
        self.received = 0
        self._inbox: list[RawChange] = []
        self._fetching = False

    def take(self, entries: Sequence[RawChange]) -> None:
        """Entries read, in order."""
        self._inbox.extend(entries)
        self.received = max(self.received, entries[-1][0])
        if not self._fetching:
            self._drain()

    def restart(self, at: int) -> None:
        """The source starts again after sequence number ``at``."""
        self._inbox.clear()
        self.applied = self.received = at

    def _drain(self) -> None:
        entries, self._inbox = self._inbox, []
        a, tasks = self.a, self._tasks
        want = [e[1] for e in entries if e[4] and e[0] > self.applied and wanted(a, e, tasks)]
        if not want:
            self.applied = fan_out(a, self._decode, entries, self.applied, {}, tasks)
            return
        ids = list(dict.fromkeys(want))
        self._fetching = True

        def fetched(texts: list[str | None] | None) -> None:
            found = {i: t for i, t in zip(ids, texts or (), strict=False) if t is not None}
            self._fetching = False
            self.applied = fan_out(a, self._decode, entries, self.applied, found, tasks)
            if self._inbox:
                self._drain()

        self._fetch(ids, fetched)
