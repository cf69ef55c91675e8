"""``Following``: what one process reads of the shared task space's changes.

Two sources, each fanned out in order by a ``Feed`` of its own:

- the **notes** (``notes.Notes``): sharded pub/sub, the channels of the tasks this
  process holds a waiter or a per-task event stream of, and its own channel (its
  runners). Per-task subscriptions, waiters and runners are fed from here only.
- the **stream** (``keys.CHANGES``), read only while an event stream here follows
  every task (``GET /events`` without a task): it gets every change, in order, from
  here only. Read from where such a subscription starts; stopped when none is left.

A wait or a per-task subscription is handled once its task's channel is confirmed
(``ready``), so that a change after its read is never missed; channels nobody here
needs any more are left at the end of each batch (``tidy``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..._errors import StoreError, TaskNotFound
from ..._models import TERMINAL, TaskRecord
from ...actor import messages as m
from ...actor.engine import DEFERRED, Deferred, Host
from ...actor.hub import RECENT_EVENTS
from ...actor.subscription import Subscription
from ...actor.timers import Kind
from . import keys
from .background import Background, Changes, Feed, RawChange, Resync, fan_out
from .notes import OWN, Noted, NotedChanges, Notes, NotesLost
from .space import decode_record

if TYPE_CHECKING:
    from .space import RedisSpace

__all__ = ["Following"]


def _never(task_id: str) -> bool:
    return False


#: Seconds a message may wait for its task's channel to be confirmed (the same as a
#: command's socket timeout) before its caller gets 503.
HOLD: Final = 2.0

#: Channels nobody needs are left at most this often (seconds), or at once when this
#: many are followed.
TIDY_EVERY: Final = 1.0
TIDY_AT: Final = 1024


class Send(Protocol):
    """The engine's ``_send``: queue one command in the actor's batch; ``done`` gets
    its reply and returns the caller's answer, ``on_error`` runs if it fails."""

    def __call__(
        self,
        name: str,
        args: Sequence[str],
        done: Callable[[Any], object],
        fut: asyncio.Future[Any] | None,
        retry: object = None,
        on_error: Callable[[], object] | None = None,
        base: str | None = None,
    ) -> Deferred: ...


class Following:
    """The notes and the stream of one process's Redis engine: one notes connection,
    feed and stream reader per shard (on a single Redis, the only one)."""

    def __init__(
        self, space: RedisSpace, proc: str, a: Host, send: Send, background: Background
    ) -> None:
        self._space = space
        self._proc = proc
        self._a = a
        self._send = send
        self._background = background
        #: Each shard's notes connection, made when first needed.
        self.notes: dict[str, Notes] = {}
        self._notes_tasks: list[asyncio.Task[None]] = []
        self._started = False
        # Shards whose notes connection follows this process's channel.
        self._own: set[str] = set()
        self.tasks: dict[str, Feed] = {}
        self.everything: dict[str, Feed] = {}
        # Tasks whose channel is followed (confirmed), with their shard, and those
        # asked for with the messages held until Redis confirms.
        self._noted: dict[str, str] = {}
        self._noting: dict[str, list[tuple[object, asyncio.Future[Any] | None]]] = {}
        # When each task's channel was asked for: held past HOLD, its messages fail.
        self._asked: dict[str, tuple[float, str]] = {}
        self._next_tidy = 0.0
        self._readers: dict[str, asyncio.Task[None]] = {}
        # Readers cancelled and not yet finished (awaited at stop).
        self._stopping: set[asyncio.Task[None]] = set()
        self._reader_no = 0
        # The number of the running reader of each shard's stream.
        self._reader_ids: dict[str, int] = {}

    def _feed(self, feeds: dict[str, Feed], base: str, *, tasks: bool) -> Feed:
        feed = feeds.get(base)
        if feed is None:
            fetch = functools.partial(self._fetch, base)
            feed = feeds[base] = Feed(self._a, self._space.decode, fetch, tasks=tasks)
        return feed

    def notes_of(self, base: str) -> Notes:
        """A shard's notes connection (made, and read once started, on first use)."""
        notes = self.notes.get(base)
        if notes is None:
            a = self._a
            notes = self.notes[base] = Notes(
                self._space, self._proc, a.post, lambda: a.closed, base
            )
            if self._started:
                self._run(notes)
        return notes

    def _run(self, notes: Notes) -> None:
        task = asyncio.get_running_loop().create_task(notes.run(), name="taskd-notes")
        self._notes_tasks.append(task)

    def handlers(self) -> dict[type[Any], Callable[[Any, object], None]]:
        """The handlers of what the notes and the stream reader post."""
        return {
            NotedChanges: lambda msg, fut: self._feed(self.tasks, msg.base, tasks=True).take(
                msg.entries
            ),
            Noted: self._on_noted,
            NotesLost: self._on_notes_lost,
            Changes: self._on_changes,
            Resync: self._on_resync,
        }

    async def open(self, seq: int) -> None:
        """Follow this process's channel (before it spawns anything); changes up to
        ``seq`` are before this process."""
        home = self._space.base
        self._feed(self.tasks, home, tasks=True).restart(seq)
        await self.notes_of(home).open()
        self._own.add(home)

    def start(self) -> None:
        """Start reading the notes."""
        self._started = True
        for notes in self.notes.values():
            self._run(notes)

    async def stop(self) -> None:
        """Stop reading, close the connections."""
        tasks = [*self._notes_tasks, *self._readers.values(), *self._stopping]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._notes_tasks.clear()
        self._readers.clear()
        for notes in self.notes.values():
            await notes.aclose()

    # --- per-task channels ---------------------------------------------------------------

    def ready(self, task_id: str, msg: object, fut: asyncio.Future[Any] | None, base: str) -> bool:
        """Whether the task's channel (in shard ``base``) is followed; if not, follow
        it and hold the message until Redis confirms (then it is handled again).
        ``OWN`` for a task id: whether the shard's notes follow this process's
        channel (a spawn there waits for it)."""
        if task_id in self._noted or (task_id == OWN and base in self._own):
            return True
        key = task_id if task_id != OWN else OWN + base
        held = self._noting.get(key)
        if held is None:
            a = self._a
            held = self._noting[key] = []
            self._asked[key] = (a.now, base)
            # (wakes the loop then, so that tidy can fail what is still held)
            a.timers.push(a.now + HOLD, Kind.RETRY, "")
            notes = self.notes_of(base)
            if task_id != OWN:
                notes.follow(task_id)
        held.append((msg, fut))
        return False

    def _on_noted(self, msg: Noted, fut: object) -> None:
        if msg.task_id.startswith(OWN):
            self._own.add(msg.task_id[len(OWN) :])
        else:
            self._noted[msg.task_id] = msg.base
        self._asked.pop(msg.task_id, None)
        for held, reply in self._noting.pop(msg.task_id, ()):
            if reply is None or not reply.done():  # (a caller gone meanwhile: nothing to do)
                self._a.dispatch(held, reply)

    def tidy(self) -> None:
        """End of a batch: send the batch's follows; leave the channels of tasks
        nobody here waits on or follows (at most once a second, all in one command:
        a channel kept a little longer only costs the notes of a task nobody waits
        on, and a wait on it meanwhile needs no new confirmation); stop reading the
        stream if no subscription follows every task."""
        a = self._a
        if self._asked:
            self._give_up(a.now - HOLD)
        noted = self._noted
        if noted and (a.now >= self._next_tidy or len(noted) > TIDY_AT):
            self._next_tidy = a.now + TIDY_EVERY
            traced = a.tracing.holds if a.tracing is not None else _never
            gone = [
                t for t in noted if not a.waiters.get(t) and not a.hub.follows(t) and not traced(t)
            ]
            for task_id in gone:
                self.notes_of(noted.pop(task_id)).unfollow([task_id])
        for notes in self.notes.values():
            notes.flush()
        if self._readers and not a.hub.follows_all:
            # Cancelled now, awaited at stop (each closes its own connection); what
            # they post meanwhile is dropped (their number is no longer current).
            for reader in self._readers.values():
                reader.cancel()
                self._stopping.add(reader)
                reader.add_done_callback(self._stopping.discard)
            self._readers.clear()

    def _give_up(self, before: float) -> None:
        """Fail the messages held for a channel asked for before ``before`` and not
        confirmed (Redis stalled, or the connection is down): 503, as any command
        Redis does not answer in time, rather than a wait that hangs until it does."""
        late = [(t, base) for t, (at, base) in self._asked.items() if at <= before]
        for task_id, base in late:
            del self._asked[task_id]
            for _, reply in self._noting.pop(task_id, ()):
                if reply is not None and not reply.done():
                    reply.set_exception(
                        StoreError("the shared store (Redis) did not confirm a subscription")
                    )
            if not task_id.startswith(OWN):
                self.notes_of(base).unfollow([task_id])

    def _on_notes_lost(self, msg: NotesLost, fut: object) -> None:
        # The channels asked for before the reconnect are followed again (and
        # confirmed): their held messages go on (the others' confirmations follow as
        # Noted); what was held may have missed changes: read again, end per-task
        # streams (their clients resume with Last-Event-ID).
        for task_id in [t for t in self._noting if t in msg.followed]:
            self._on_noted(Noted(task_id, msg.base), None)
        a = self._a
        shards = self._space.shards
        traced = a.tracing.held() if a.tracing is not None else ()
        for task_id in {*a.waiters, *a.runners, *traced}:
            base = self._noted.get(task_id) or shards.of_id(task_id)
            if base == msg.base:
                self._send(
                    "GET", (self._space.key(keys.RECORD + task_id, base),), self._reread, None
                )
        a.hub.close(everything=False)

    def _reread(self, text: str | None) -> None:
        if text is None:
            return
        rec, seq = self._space.decode(text)
        if rec.status in TERMINAL or rec.task_id in self._a.runners:
            # As a note of the record's latest version (the feed's order is kept:
            # this one is applied out of it, by sequence number only for itself).
            entry: RawChange = (seq, rec.task_id, rec.status.value, text, False)
            fan_out(self._a, self._space.decode, [entry], seq - 1, {}, True)

    def _fetch(
        self, base: str, ids: list[str], done: Callable[[list[str | None] | None], None]
    ) -> None:
        key = self._space.key
        keys_ = tuple(key(keys.RECORD + i, base) for i in ids)
        self._send("MGET", keys_, done, None, on_error=lambda: done(None))

    def subscribe(
        self,
        msg: m.Subscribe,
        fut: asyncio.Future[Any] | None,
        boot_seq: int,
        bases: list[str],
    ) -> Deferred:
        """``Subscribe``: a per-task subscription once its channel is followed, from
        the record; one to every task from the stream's head; either after a replay
        of what a resuming client missed (from the stream: any process resumes any
        id). ``bases``: the task's shard, or the shards a subscription to every task
        follows: with several (an admin's, on a cluster), each shard's stream from its
        head, and no replay (event ids are per shard)."""
        sub = msg.subscription
        if len(bases) > 1:
            return self._subscribe_shards(sub, fut, bases)
        base = bases[0]
        if sub.task_id is not None and not self.ready(sub.task_id, msg, fut, base):
            return DEFERRED  # handled again once this process follows the task's notes
        replay: list[tuple[int, TaskRecord]] = []
        head = [0]  # changes up to here are in the reply or the replay
        after = sub.resume_from
        if after is not None and after >= boot_seq:
            limit = RECENT_EVENTS + 1
            args = (f"{after + 1}-0", str(limit))

            def missed(reply: list[Any]) -> None:
                # Entries of deleted tasks are not in the reply (the script drops them).
                flat = reply[2]
                entries = [
                    (int(flat[i]), decode_record(flat[i + 1])[0]) for i in range(0, len(flat), 2)
                ]
                # Through the last entry read, kept or not: a deleted task's
                # changes are not sent live either.
                head[0] = max(head[0], int(reply[3] or 0))
                if int(reply[1]) < limit:  # else too many to replay: the current state
                    replay.extend(entries)
                    if reply[4] and int(reply[4]) == after + 1:
                        # Nothing was trimmed: the gaps are changes of deleted tasks,
                        # left out on purpose; the replay covers everything since.
                        sub.resume_from = entries[0][0] - 1 if entries else head[0]

            self._send("replay", args, missed, None, base=base)
        if sub.task_id is None:
            # The stream's head, read after the replay: the reader of every change
            # starts there (or goes on from where it is).
            def start(seq: str | None) -> None:
                at = self.subscribe_all(max(head[0], int(seq or 0)), base)
                self._a.hub.subscribe(sub, None, at, replay)

            return self._send("GET", (self._space.key(keys.SEQ, base),), start, fut)

        def done(text: str | None) -> TaskRecord:
            rec = self._space.seen(text, sub.owner)
            if rec is None:
                raise TaskNotFound(sub.task_id or "")
            seq = self._space.decode(text or "")[1]
            self._a.hub.subscribe(sub, rec, max(seq, head[0]), replay)
            return rec

        return self._send("GET", (self._space.key(keys.RECORD + sub.task_id, base),), done, fut)

    def _subscribe_shards(
        self, sub: Subscription, fut: asyncio.Future[Any] | None, bases: list[str]
    ) -> Deferred:
        heads: dict[str, int] = {}

        def start(base: str, seq: str | None) -> object:
            heads[base] = int(seq or 0)
            if len(heads) < len(bases):
                return DEFERRED
            for b, at in heads.items():
                self.subscribe_all(at, b)
            # Each shard's events are numbered by its own stream: none is held back as
            # "before the subscription" by another shard's number.
            sub.resume_from = None
            self._a.hub.subscribe(sub, None, 0, [])
            return None

        for base in bases:
            done = functools.partial(start, base)
            self._send("GET", (self._space.key(keys.SEQ, base),), done, fut, base=base)
        return DEFERRED

    # --- the stream, for subscriptions to every task ---------------------------------------

    def subscribe_all(self, at: int, base: str) -> int:
        """A subscription to every task starts after sequence number ``at`` (the
        shard's stream head as read, or where its replay ended): start reading the
        stream there. Returns where it starts: a reader already running goes on from
        its own place (entries up to ``at`` it has yet to read are before the
        subscription)."""
        feed = self._feed(self.everything, base, tasks=False)
        if base in self._readers:
            return max(at, feed.received)
        self._reader_no += 1
        self._reader_ids[base] = self._reader_no
        feed.restart(at)
        self._readers[base] = self._background.read_changes(at, self._reader_no, base)
        return at

    def new_shard(self, base: str) -> None:
        """A shard this process had not seen: while subscriptions follow every
        task, read its stream from its start (all of it is newer than they are)."""
        if self._readers and base not in self._readers:
            self.subscribe_all(0, base)

    def _on_changes(self, msg: Changes, fut: object) -> None:
        if self._reader_ids.get(msg.base) == msg.reader and msg.base in self._readers:
            self._feed(self.everything, msg.base, tasks=False).take(msg.entries)

    def _on_resync(self, msg: Resync, fut: object) -> None:
        if msg.reader in self._reader_ids.values():
            # A stream reader lost entries: end the subscriptions that follow every
            # task; their clients resume with Last-Event-ID.
            self._a.hub.close(tasks=False)

    def shut(self) -> None:
        """The loop is ending: held messages' callers get None (then TrackerClosed)."""
        for held in self._noting.values():
            for _, fut in held:
                if fut is not None:
                    self._a.replies.append((fut, None, None))
        self._noting.clear()
