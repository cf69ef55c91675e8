"""``Pipeline``: the local engine's commit to a durable store (``SQLiteStore``),
pipelined.

One write is in flight at a time. While the store commits a group of batches (one
transaction, on its own thread), the actor goes on handling the next batches: their
changes and their effects — replies, handles to settle, runners to start — gather
into the next group instead of waiting on the actor. When the write ends, its done
callback posts ``Committed``; the actor, the one owner of all of it, hands that back
here, and the group's effects go out in order: its replies, its changes to the hub
(subscriptions, waiters, webhooks), its handles and runners. The next group's write
starts at the end of that batch. So nothing is acknowledged before it is on disk (a
read waits for the group it was answered in, like a write: nobody sees what is not
committed), and writes and their publication keep their order.

A write that fails: its group's callers get ``StoreError`` (503), and so do those of
every batch handled since, which were accepted before the failure was known; their
runners never start (their records are failed). The changes stay in memory and
pending (``_unwritten``), as do their notifications and settlements; until a later
write takes them, caller commands that would change a record are refused up front
(``LocalEngine.refuses``; reads go on) and a timer retries (``retry_due``).

While the actor drains or stops, each commit waits for its write, so that shutdown
waits for the runners of every spawn accepted before it, and the last batch is on disk
before the loop ends. ``stop`` leaves no write behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any, Final

from .._errors import StoreError
from .._models import TERMINAL, TaskRecord, TaskStatus
from ..actor import messages as m
from ..actor.timers import Kind
from .state import TaskState
from .store import Store

if TYPE_CHECKING:
    from ..actor.engine import Engine, Host
    from ..actor.runner import Runner
    from .trees import Change

__all__ = ["STORE_RETRY", "Group", "Pipeline"]

log = logging.getLogger("taskd")

#: Seconds between attempts to write to a store that failed.
STORE_RETRY: Final = 0.5

_Reply = tuple["asyncio.Future[Any]", "BaseException | None", object]


class Group:
    """What consecutive batches changed, and what waits for it to be committed."""

    __slots__ = ("changed", "dirty", "launch", "replies", "settle")

    def __init__(self) -> None:
        #: What to write: id → record, None for a removed one.
        self.dirty: dict[str, TaskRecord | None] = {}
        #: What to publish once written, in order.
        self.changed: list[tuple[int, TaskRecord]] = []
        self.replies: list[_Reply] = []
        self.launch: list[Runner] = []
        self.settle: list[tuple[Runner, TaskRecord]] = []

    def add(self, later: Group) -> None:
        """Take ``later``'s changes and effects after this group's."""
        self.dirty.update(later.dirty)
        self.changed += later.changed
        self.replies += later.replies
        self.launch += later.launch
        self.settle += later.settle


class Pipeline:
    """The commit of a ``LocalEngine`` with a persistent store; see the module
    docstring."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        state: TaskState,
        change: Change,
        on_terminal: Callable[[TaskRecord], None],
    ) -> None:
        self._engine = engine
        self._store = store
        self._state = state
        self._change = change
        self._on_terminal = on_terminal
        #: Set by the retry timer: the next commit writes what the store refused.
        self.retry_due = False
        # The write in flight and its group; the group gathering behind it; what the
        # store failed to write (and what waits for it).
        self._writing: asyncio.Future[None] | None = None
        self._written: Group | None = None
        self._next: Group | None = None
        self._unwritten: Group | None = None

    async def commit(self) -> None:
        """The end of a batch: its changes and effects join the next group, whose
        write starts now if none is in flight (draining or stopping: and is awaited)."""
        a = self._engine.actor
        self._gather(a)
        wait = a.draining or a.stopping
        if self._writing is not None:
            if not wait:
                return  # written after the one in flight, at the end of the batch
                # that lets that one out (``committed``)
            await self._wait()
        self._start(a)
        if wait and self._writing is not None:
            await self._wait()

    def committed(self, msg: m.Committed) -> None:
        """The write in flight ended (its done callback posted ``msg``)."""
        if msg.write is self._writing:  # (not one ``commit`` awaited itself)
            self._finish()

    def uncommitted(self) -> Iterable[tuple[int, TaskRecord]]:
        """Every change not published yet, in order (for a subscriber joining now)."""
        groups = (self._unwritten, self._written, self._next)
        return chain(*(g.changed for g in groups if g is not None), self._state.pending_changes)

    def shut(self) -> None:
        """The loop is ending: the callers of groups not committed are the actor's to
        fail (``TrackerClosed``); say what the store never took (its callers got 503)."""
        a = self._engine.actor
        for group in (self._written, self._next):
            if group is not None:
                a.replies += group.replies
        self._written = self._next = None
        if self._unwritten is not None and self._unwritten.dirty:
            log.error(
                "closing with %d change(s) the store could not write", len(self._unwritten.dirty)
            )

    async def stop(self) -> None:
        """Leave no write behind (one in flight only if the loop died)."""
        write, self._writing = self._writing, None
        if write is not None:
            write.cancel()
            await asyncio.wait((write,))

    # --- inside -----------------------------------------------------------------------

    def _gather(self, a: Host) -> Group:
        """Move the changes and effects handled since the last call into the next group."""
        group = self._next
        if group is None:
            group = self._next = Group()
        dirty, changed = self._state.take_changes()
        if dirty:
            if group.dirty:
                group.dirty.update(dirty)
            else:
                group.dirty = dirty
        if changed:
            group.changed += changed
        if a.replies:
            group.replies += a.replies
            a.replies = []
        if a.launch:
            group.launch += a.launch
            a.launch = []
        if a.settle:
            group.settle += a.settle
            a.settle = []
        return group

    def _start(self, a: Host) -> None:
        """Write the next group (with what the store failed to write before it), or
        let it out at once if it changed nothing."""
        group, self._next = self._next, None
        if self._engine.store_error is not None and not self.retry_due:
            if group is not None:
                self._hold(group, a)  # until the retry timer
            return
        if self._unwritten is not None:
            held, self._unwritten = self._unwritten, None
            if group is not None:
                held.add(group)
            group = held
        if group is None:
            return
        if not group.dirty:
            self._release(group, a)
            return
        self.retry_due = False
        upserts = [r for r in group.dirty.values() if r is not None]
        deletes = [i for i, r in group.dirty.items() if r is None]
        write: asyncio.Future[None]
        try:
            write = asyncio.ensure_future(self._store.write(upserts, deletes))
        except Exception as exc:  # (a store that fails before its write is under way)
            write = asyncio.get_running_loop().create_future()
            write.set_exception(exc)
        write.add_done_callback(self._ended)
        self._writing, self._written = write, group

    def _ended(self, write: asyncio.Future[None]) -> None:
        """The write's done callback: the actor takes it from here."""
        if not write.cancelled():
            write.exception()  # (retrieved: ``_finish`` reads it again)
        a = self._engine.actor
        if not a.closed:
            a.mailbox.put_nowait((m.Committed(write), None))

    async def _wait(self) -> None:
        """Await the write in flight and let its group out."""
        write = self._writing
        assert write is not None
        await asyncio.wait((write,))
        if self._writing is write:
            self._finish()

    def _finish(self) -> None:
        write, group = self._writing, self._written
        assert write is not None and group is not None
        self._writing = self._written = None
        a = self._engine.actor
        exc = StoreError("the write was cancelled") if write.cancelled() else write.exception()
        if exc is None:
            if self._engine.store_error is not None:
                log.warning("the store writes again: %d change(s) committed", len(group.dirty))
                self._engine.store_error = None
            self._release(group, a)
        else:
            self._failed(exc, group, a)

    def _release(self, group: Group, a: Host) -> None:
        """The group is committed: answer, publish, settle and start what waited."""
        if group.replies:
            a.answer(group.replies)
        dirty = group.dirty
        if group.changed:
            a.hub.publish(group.changed, self._on_terminal)
        if None in dirty.values():  # removed tasks: out of the replay ring too
            a.hub.forget([i for i, r in dirty.items() if r is None])
        if group.settle or group.launch:
            a.release(group.settle, group.launch)

    def _hold(self, group: Group, a: Host) -> None:
        """The store cannot write and no retry is due: keep the group's changes and
        what waits for them; answer its replies (reads: writes are refused)."""
        if group.replies:
            a.answer(group.replies)
            group.replies = []
        if self._unwritten is None:
            self._unwritten = group
        else:
            self._unwritten.add(group)

    def _failed(self, exc: BaseException, group: Group, a: Host) -> None:
        """The store could not commit the group. The first failure's callers get
        ``StoreError`` (503), with those of every batch handled since: nothing is
        acknowledged that is not on disk. The changes stay pending (``_unwritten``)
        for a later attempt; until then writes are refused up front and a timer
        retries the write."""
        engine = self._engine
        reason = f"{type(exc).__name__}: {exc}"
        first = engine.store_error is None
        if first:
            log.error("the store cannot write; refusing changes until it can: %s", reason)
        engine.store_error = reason
        a.timers.push(a.now + STORE_RETRY, Kind.RETRY, "")
        if first:
            failed = StoreError(f"the store cannot write: {reason}")
            later = self._gather(a)  # accepted before this failure was known
            self._next = None
            self._refuse(group, failed, a)
            self._refuse(later, failed, a)
            group.add(later)
        self._hold(group, a)

    def _refuse(self, group: Group, failed: StoreError, a: Host) -> None:
        """Fail the group's callers; its spawns were refused to them: never run."""
        for fut, error, _ in group.replies:
            if not fut.done():
                fut.set_exception(failed if error is None else error)
        group.replies = []
        for runner in group.launch:
            if runner.coro is None:
                continue  # cancelled before it started, and recorded so
            runner.close()
            runner.settle_with = (TaskStatus.FAILED, None, failed)
            rec = self._state.get(runner.task_id)
            if rec is not None and rec.status not in TERMINAL:
                self._change(rec, TaskStatus.FAILED, error="not started: the store cannot write")
            a.runners.pop(runner.task_id, None)
        group.launch = []
