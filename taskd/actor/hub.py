"""The subscription hub: who follows which changes, and the replay ring.

Per-task and global subscriptions (``taskd._watch.Subscription``), fed by the actor
with each batch's changes once they are committed. The latest changes are kept for
``Last-Event-ID`` resumption — a small ring, kept only once someone has subscribed
(it holds old record versions alive), and from this boot only: an id from before
the boot's first sequence number gets the current state instead of a replay.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Final

from .._models import TERMINAL, TaskRecord
from .subscription import Subscription

__all__ = ["RECENT_EVENTS", "Hub"]

#: How many changes the replay ring holds.
RECENT_EVENTS: Final = 512


class Hub:
    """Subscriptions and the replay ring (owned by the actor; no asyncio here)."""

    def __init__(self, boot_seq: int) -> None:
        self._boot_seq = boot_seq
        self._task_subs: dict[str, list[Subscription]] = {}
        self._global_subs: list[Subscription] = []
        # (sequence number, record), or None where the task was removed since
        self._recent: deque[tuple[int, TaskRecord | None]] | None = None

    def __len__(self) -> int:
        return len(self._global_subs) + sum(map(len, self._task_subs.values()))

    def subscribe(
        self,
        sub: Subscription,
        rec: TaskRecord | None,
        seq: int,
        pending: Iterable[tuple[int, TaskRecord]],
    ) -> None:
        """Register ``sub``: replay what it missed (when ``resume_from`` is still in
        the ring), and from ``seq`` on, give it every change. ``rec`` is the task's
        current record for a per-task subscription; ``pending`` are changes up to
        ``seq`` that are not committed yet (they are in ``rec``, or in the replay)."""
        if self._recent is None:
            self._recent = deque(maxlen=RECENT_EVENTS)
        self._replay(sub, seq, pending)
        sub.since = seq  # earlier changes are in the reply or the replay
        if sub.task_id is None:
            self._global_subs.append(sub)
            return
        assert rec is not None
        if rec.status in TERMINAL:
            sub.end()
        else:
            self._task_subs.setdefault(rec.task_id, []).append(sub)

    def _replay(
        self, sub: Subscription, seq: int, pending: Iterable[tuple[int, TaskRecord]]
    ) -> None:
        after = sub.resume_from
        recent = self._recent
        if after is None or recent is None or not self._boot_seq <= after <= seq:
            return  # none, or from another boot: the subscriber gets the current state
        held: list[tuple[int, TaskRecord | None]] = list(chain(recent, pending))
        if after < seq and (not held or held[0][0] > after + 1):
            return  # some are gone: the subscriber gets the current state instead
        sub.since = after
        for n, rec in held:
            if rec is None:
                continue  # a removed task's change: never replayed
            # matches() checks the owner; a per-task subscriber was checked on subscribe
            wanted = rec.task_id == sub.task_id if sub.task_id is not None else sub.matches(rec)
            if n > after and wanted:
                sub.push(n, rec)
        sub.resumed = True

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop removed (deleted, expired, evicted) tasks' versions from the ring: a
        ``Last-Event-ID`` replay must not bring back what was deleted."""
        recent = self._recent
        if recent:
            gone = set(task_ids)
            if gone and any(rec is not None and rec.task_id in gone for _, rec in recent):
                # A placeholder keeps the sequence number: the ring still shows that
                # nothing is missing before it.
                kept = [
                    (n, None if rec is None or rec.task_id in gone else rec) for n, rec in recent
                ]
                recent.clear()
                recent.extend(kept)

    def shared(self) -> None:
        """Keep no replay ring: in a shared task space, changes to replay are read
        from the change stream when a client resumes (``subscribe``'s ``pending``),
        so any process can resume any id."""
        self._recent = deque(maxlen=0)

    def follows(self, task_id: str) -> bool:
        """Whether a per-task subscription follows this task."""
        return task_id in self._task_subs

    @property
    def follows_all(self) -> bool:
        """Whether any subscription follows every task (that matches its filter)."""
        return bool(self._global_subs)

    def unsubscribe(self, sub: Subscription) -> None:
        """Drop ``sub`` (and end it)."""
        sub.end()
        if sub.task_id is None:
            self._global_subs = [s for s in self._global_subs if s is not sub]
            return
        subs = self._task_subs.get(sub.task_id)
        if subs is not None:
            subs[:] = [s for s in subs if s is not sub]
            if not subs:
                del self._task_subs[sub.task_id]

    def publish(
        self,
        changed: list[tuple[int, TaskRecord]],
        on_terminal: Callable[[TaskRecord], None] | None,
        *,
        tasks: bool = True,
        everything: bool = True,
    ) -> None:
        """Hand committed changes to their subscribers; a per-task subscription ends
        after its terminal change. ``on_terminal`` is called for each terminal one.
        An engine that reads changes from two sources (per-task notes, and a stream of
        every change) publishes each to one kind: per-task subscriptions (``tasks``)
        or those that follow every task (``everything``)."""
        task_subs = self._task_subs if tasks else {}
        global_subs = self._global_subs if everything else []
        recent = self._recent
        for seq, rec in changed:
            if recent is not None:
                recent.append((seq, rec))
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
                if on_terminal is not None:
                    on_terminal(rec)
        if global_subs and any(s.ended for s in global_subs):
            # overflowed or ended from outside: drop them once, after the whole batch
            self._global_subs = [s for s in global_subs if not s.ended]

    def close(self, *, tasks: bool = True, everything: bool = True) -> None:
        """End every subscription (per-task ones, those that follow every task)."""
        if tasks:
            for subs in self._task_subs.values():
                for sub in subs:
                    sub.end()
            self._task_subs.clear()
        if everything:
            for sub in self._global_subs:
                sub.end()
            self._global_subs.clear()
