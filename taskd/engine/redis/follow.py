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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..._errors import StoreError, TaskNotFound
from ..._models import TERMINAL, TaskRecord
from ...actor import messages as m
from ...actor.engine import DEFERRED, Deferred, Host
from ...actor.hub import RECENT_EVENTS
from ...actor.timers import Kind
from . import keys
from .background import Background, Changes, Feed, RawChange, Resync, fan_out
from .notes import Noted, NotedChanges, Notes, NotesLost
from .space import decode_record

if TYPE_CHECKING:
    from .space import RedisSpace

__all__ = ["Following"]

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
    ) -> Deferred: ...


class Following:
    """The notes and the stream of one process's Redis engine."""

    def __init__(
        self, space: RedisSpace, proc: str, a: Host, send: Send, background: Background
    ) -> None:
        self._space = space
        self._a = a
        self._send = send
        self._background = background
        self.notes = Notes(space, proc, a.post, lambda: a.closed)
        decode = space.decode
        self.tasks = Feed(a, decode, self._fetch, tasks=True)
        self.everything = Feed(a, decode, self._fetch, tasks=False)
        # Tasks whose channel is followed (confirmed), and those asked for with the
        # messages held until Redis confirms.
        self._noted: set[str] = set()
        self._noting: dict[str, list[tuple[object, asyncio.Future[Any] | None]]] = {}
        # When each task's channel was asked for: held past HOLD, its messages fail.
        self._asked: dict[str, float] = {}
        self._next_tidy = 0.0
        self._reader: asyncio.Task[None] | None = None
        # Readers cancelled and not yet finished (awaited at stop).
        self._stopping: set[asyncio.Task[None]] = set()
        self._reader_no = 0
        self._notes_task: asyncio.Task[None] | None = None

    def handlers(self) -> dict[type[Any], Callable[[Any, object], None]]:
        """The handlers of what the notes and the stream reader post."""
        return {
            NotedChanges: lambda msg, fut: self.tasks.take(msg.entries),
            Noted: self._on_noted,
            NotesLost: self._on_notes_lost,
            Changes: self._on_changes,
            Resync: self._on_resync,
        }

    async def open(self, seq: int) -> None:
        """Follow this process's channel (before it spawns anything); changes up to
        ``seq`` are before this process."""
        self.tasks.restart(seq)
        await self.notes.open()

    def start(self) -> None:
        """Start reading the notes."""
        self._notes_task = asyncio.get_running_loop().create_task(
            self.notes.run(), name="taskd-notes"
        )

    async def stop(self) -> None:
        """Stop reading, close the connection."""
        tasks = [t for t in (self._notes_task, self._reader, *self._stopping) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._notes_task = self._reader = None
        await self.notes.aclose()

    # --- per-task channels ---------------------------------------------------------------

    def ready(self, task_id: str, msg: object, fut: asyncio.Future[Any] | None) -> bool:
        """Whether the task's channel is followed; if not, follow it and hold the
        message until Redis confirms (then it is handled again)."""
        if task_id in self._noted:
            return True
        held = self._noting.get(task_id)
        if held is None:
            a = self._a
            held = self._noting[task_id] = []
            self._asked[task_id] = a.now
            # (wakes the loop then, so that tidy can fail what is still held)
            a.timers.push(a.now + HOLD, Kind.RETRY, "")
            self.notes.follow(task_id)
        held.append((msg, fut))
        return False

    def _on_noted(self, msg: Noted, fut: object) -> None:
        self._noted.add(msg.task_id)
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
            gone = [t for t in noted if not a.waiters.get(t) and not a.hub.follows(t)]
            noted.difference_update(gone)
            self.notes.unfollow(gone)
        self.notes.flush()
        reader = self._reader
        if reader is not None and not a.hub.follows_all:
            # Cancelled now, awaited at stop (it closes its own connection); what it
            # posts meanwhile is dropped (its number is no longer current).
            reader.cancel()
            self._stopping.add(reader)
            reader.add_done_callback(self._stopping.discard)
            self._reader = None

    def _give_up(self, before: float) -> None:
        """Fail the messages held for a channel asked for before ``before`` and not
        confirmed (Redis stalled, or the connection is down): 503, as any command
        Redis does not answer in time, rather than a wait that hangs until it does."""
        late = [t for t, at in self._asked.items() if at <= before]
        for task_id in late:
            del self._asked[task_id]
            for _, reply in self._noting.pop(task_id, ()):
                if reply is not None and not reply.done():
                    reply.set_exception(
                        StoreError("the shared store (Redis) did not confirm a subscription")
                    )
        self.notes.unfollow(late)

    def _on_notes_lost(self, msg: NotesLost, fut: object) -> None:
        # The channels asked for before the reconnect are followed again (and
        # confirmed): their held messages go on (the others' confirmations follow as
        # Noted); what was held may have missed changes: read again, end per-task
        # streams (their clients resume with Last-Event-ID).
        for task_id in [t for t in self._noting if t in msg.followed]:
            self._on_noted(Noted(task_id), None)
        a = self._a
        for task_id in {*a.waiters, *a.runners}:
            self._send("GET", (self._space.key(keys.RECORD + task_id),), self._reread, None)
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

    def _fetch(self, ids: list[str], done: Callable[[list[str | None] | None], None]) -> None:
        key = self._space.key
        keys_ = tuple(key(keys.RECORD + i) for i in ids)
        self._send("MGET", keys_, done, None, on_error=lambda: done(None))

    def subscribe(
        self, msg: m.Subscribe, fut: asyncio.Future[Any] | None, boot_seq: int
    ) -> Deferred:
        """``Subscribe``: a per-task subscription once its channel is followed, from
        the record; one to every task from the stream's head; either after a replay
        of what a resuming client missed (from the stream: any process resumes any
        id)."""
        sub = msg.subscription
        if sub.task_id is not None and not self.ready(sub.task_id, msg, fut):
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

            self._send("replay", args, missed, None)
        if sub.task_id is None:
            # The stream's head, read after the replay: the reader of every change
            # starts there (or goes on from where it is).
            def start(seq: str | None) -> None:
                at = self.subscribe_all(max(head[0], int(seq or 0)))
                self._a.hub.subscribe(sub, None, at, replay)

            return self._send("GET", (self._space.key(keys.SEQ),), start, fut)

        def done(text: str | None) -> TaskRecord:
            rec = self._space.seen(text, sub.owner)
            if rec is None:
                raise TaskNotFound(sub.task_id or "")
            seq = self._space.decode(text or "")[1]
            self._a.hub.subscribe(sub, rec, max(seq, head[0]), replay)
            return rec

        return self._send("GET", (self._space.key(keys.RECORD + sub.task_id),), done, fut)

    # --- the stream, for subscriptions to every task ---------------------------------------

    def subscribe_all(self, at: int) -> int:
        """A subscription to every task starts after sequence number ``at`` (the
        stream's head as read, or where its replay ended): start reading the stream
        there. Returns where it starts: a reader already running goes on from its own
        place (entries up to ``at`` it has yet to read are before the subscription)."""
        if self._reader is not None:
            return max(at, self.everything.received)
        self._reader_no += 1
        self.everything.restart(at)
        self._reader = self._background.read_changes(at, self._reader_no)
        return at

    def _on_changes(self, msg: Changes, fut: object) -> None:
        if msg.reader == self._reader_no and self._reader is not None:
            self.everything.take(msg.entries)

    def _on_resync(self, msg: Resync, fut: object) -> None:
        if msg.reader == self._reader_no:
            # The stream reader lost entries: end the subscriptions that follow every
            # task; their clients resume with Last-Event-ID.
            self._a.hub.close(tasks=False)

    def shut(self) -> None:
        """The loop is ending: held messages' callers get None (then TrackerClosed)."""
        for held in self._noting.values():
            for _, fut in held:
                if fut is not None:
                    self._a.replies.append((fut, None, None))
        self._noting.clear()
