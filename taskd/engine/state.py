"""``TaskState``: the records and everything derived from them, with no asyncio.

Records, the indexes (by status, type, owner, resource), counts by (type, status),
the active dedup keys and per-owner counts, the eviction order (TTL queues), id
minting, the change sequence and the transition rules. Commands go in (insert,
transition, remove, expire, list); changed records come out (``take_changes``),
for the actor to commit, then publish. Nothing here awaits or schedules: the actor
owns time (it passes ``now``), timers, waiters, runners and subscribers. A second
implementation of this interface — on Redis, shared by many processes — is what a
shared task space needs.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import MappingProxyType

import msgspec
from sortedcontainers import SortedList  # type: ignore[import-untyped]

from .._errors import InvalidTransition, QuotaExceeded, TaskConflict, TaskNotFound, TrackerFull
from .._models import (
    ACTIVE,
    ANY_OWNER,
    JSON,
    NO_CHILDREN,
    NO_EXTRA,
    TERMINAL,
    TRANSITIONS,
    Held,
    OwnerScope,
    RawJSON,
    TaskRecord,
    TaskStatus,
)
from .._retention import ExpiryQueues, Retention
from .codec import new_spec as new_spec  # where the actor and tests import it from
from .forest import Forest, finished_share
from .ids import IdSpace
from .rules import ACTIVE_DESCENDANTS, ADD_CHILD_VERB, DELETE_FROM

__all__ = ["Page", "TaskState"]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, and the cursor of the next (None at the end)."""

    records: tuple[TaskRecord, ...]
    next_cursor: str | None


class TaskState:
    """Every record and index of one task space; see the module docstring."""

    def __init__(self, retention: Retention, *, first_seq: int) -> None:
        self._retention = retention
        self._records: dict[str, TaskRecord] = {}
        self._by_status: dict[TaskStatus, SortedList] = {s: SortedList() for s in TaskStatus}
        self._by_type: dict[str, SortedList] = {}
        #: Ids by stage (a record's stage changes with its progress reports).
        self._by_stage: dict[str, SortedList] = {}
        self._by_owner: dict[str, SortedList] = {}
        # Resource ids are mostly unique: the value is the one task id itself until a
        # second task shares the resource, then a plain list (sorted by construction,
        # ids grow). A list or SortedList per key would cost ~80-500 bytes a record.
        self._by_resource: dict[str, str | list[str]] = {}
        self._counts: dict[tuple[str, TaskStatus], int] = {}
        self._active_keys: dict[tuple[str | None, str, str], str] = {}
        self.active = 0
        # Active tasks per owner, kept only when a per-owner quota is set.
        self._quota = retention.max_active_per_owner
        self._active_by_owner: dict[str | None, int] = {}
        self._expiry = ExpiryQueues(retention)
        #: Minting, and NOT_FOUND's hint for an id another process minted.
        self.ids = IdSpace()
        #: The sequence number of the latest change (event ids).
        self.seq = first_seq
        # Changes since the last take_changes(): latest version per id (None: removed),
        # and every version in order with its sequence number.
        self._dirty: dict[str, TaskRecord | None] = {}
        self._changed: list[tuple[int, TaskRecord]] = []
        #: Parent links: children by parent, active descendants by task.
        self.forest = Forest()
        #: Tasks whose last active descendant just ended (their held outcome, or a
        #: removal kept back, is due): the engine takes them (``LocalEngine._free``).
        self.freed: list[str] = []
        #: Finished tasks past their TTL, kept while a descendant is active.
        self.kept: set[str] = set()

    # --- reading ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    @property
    def cap(self) -> int:
        """``max_tasks``: the most records held."""
        return self._retention.max_tasks

    @property
    def quota(self) -> int | None:
        """``max_active_per_owner`` (None: no quota)."""
        return self._quota

    def get(self, task_id: str) -> TaskRecord | None:
        """The record, or None."""
        return self._records.get(task_id)

    def visible(self, task_id: str, owner: OwnerScope) -> TaskRecord:
        """The record if ``owner`` may see it, else ``TaskNotFound`` (with the id's
        hint: from the id alone, so another owner's record answers as a missing one)."""
        rec = self._records.get(task_id)
        if rec is None or (owner is not ANY_OWNER and rec.owner != owner):
            raise TaskNotFound(task_id, self.ids.hint(task_id))
        return rec

    def counts(self) -> dict[tuple[str, TaskStatus], int]:
        """Records held by (task_type, status), zero counts left out."""
        return {k: v for k, v in self._counts.items() if v}

    @property
    def pending_changes(self) -> list[tuple[int, TaskRecord]]:
        """Changes not yet taken (for a subscriber joining mid-batch)."""
        return self._changed

    def take_changes(self) -> tuple[dict[str, TaskRecord | None], list[tuple[int, TaskRecord]]]:
        """The changes since the last call: what to write, and what to publish."""
        dirty, changed = self._dirty, self._changed
        self._dirty, self._changed = {}, []
        return dirty, changed

    # --- loading ------------------------------------------------------------------------

    def load(self, records: Iterable[TaskRecord]) -> list[TaskRecord]:
        """Rebuild from a store (before anything else); returns the active records."""
        active: list[TaskRecord] = []
        finished: list[TaskRecord] = []
        for rec in sorted(records, key=lambda r: r.task_id):
            self._records[rec.task_id] = rec
            self._index_add(rec)
            self.ids.saw(rec.task_id)
            if rec.status in TERMINAL:
                finished.append(rec)
            else:
                self._count_active(rec, +1)
                if rec.resource_id is not None:
                    self._active_keys[(rec.owner, rec.task_type, rec.resource_id)] = rec.task_id
                active.append(rec)
        # Parents are older than their children: every link's parent is in place.
        forest = self.forest
        for rec in self._records.values():
            if rec.parent_id is not None:
                forest.link(rec.parent_id, rec.task_id)
        for rec in active:
            if rec.parent_id is not None:
                self._live_delta(rec.parent_id, +1)
        self.freed.clear()
        # The expiry queues are in finishing order, which is not creation order.
        for rec in sorted(finished, key=lambda r: r.finished_at or 0.0):
            self._expiry.push(rec.status, rec.task_id, rec.finished_at or 0.0, self._records.get)
        return active

    # --- changing -------------------------------------------------------------------------

    def insert(
        self,
        task_type: str,
        resource_id: str | None,
        owner: str | None,
        now: float,
        build: Callable[[str, float], TaskRecord],
        parent_id: str | None = None,
    ) -> TaskRecord:
        """Dedup, check the quota and the parent, make room under the cap, then insert
        a new record."""
        if parent_id is not None:
            self.check_parent(parent_id, owner)
        if resource_id is not None:
            holder = self._active_keys.get((owner, task_type, resource_id))
            if holder is not None:
                raise TaskConflict(holder, task_type, resource_id)
        if self._quota is not None and self._active_by_owner.get(owner, 0) >= self._quota:
            raise QuotaExceeded(owner, self._quota)
        self._make_room()
        task_id, at = self.mint(now)
        rec = build(task_id, at)
        self._add(rec)
        return rec

    def check_parent(self, parent_id: str, owner: str | None) -> TaskRecord:
        """The parent of a new task: one the new task's owner sees (else
        ``TaskNotFound``) that takes children (active and not cancelling, else
        ``InvalidTransition``)."""
        parent = self.visible(parent_id, owner)
        if parent.status not in ACTIVE or parent.status is TaskStatus.CANCELLING:
            raise InvalidTransition(parent_id, parent.status.value, ADD_CHILD_VERB)
        return parent

    def mint(self, now: float) -> tuple[str, float]:
        """A new id and its creation instant (``now``, or a microsecond past the last).

        The tracker also calls this for a spawn it answers itself (same thread, no
        await between): one sequence of ids either way. Ids start with their creation
        instant, so they sort in creation order, which every index relies on
        (``engine/ids.py``)."""
        return self.ids.mint(now)

    def insert_minted(self, rec: TaskRecord) -> TaskRecord:
        """Insert a record the tracker built (a spawn without resource_id, no quota,
        admitted against the cap): make room under the cap, then insert."""
        self._make_room()
        self._add(rec)
        return rec

    def _make_room(self) -> None:
        cap = self._retention.max_tasks
        if len(self._records) >= cap:
            if self.active >= cap:
                raise TrackerFull(f"all {cap} task slots hold active tasks")
            while len(self._records) >= cap:
                self.remove(self._oldest_terminal())
            self._expiry.compact(len(self._records) - self.active, self._records.get)

    def _add(self, rec: TaskRecord) -> None:
        task_id = rec.task_id
        resource_id = rec.resource_id
        self._records[task_id] = rec
        self._index_add(rec)
        self._count_active(rec, +1)
        if resource_id is not None:
            self._active_keys[(rec.owner, rec.task_type, resource_id)] = task_id
        self._emit(rec)
        parent_id = rec.parent_id
        if parent_id is not None:
            self.forest.link(parent_id, task_id)
            self._count_child(parent_id, None, rec.status)
            self._live_delta(parent_id, +1)

    def transition(
        self,
        rec: TaskRecord,
        status: TaskStatus,
        now: float,
        *,
        progress: float | None = None,
        message: str | None = None,
        result: JSON | RawJSON = None,
        error: str | None = None,
        action: str | None = None,
        stage: str | None = None,
        held: Held | None = None,
    ) -> TaskRecord:
        """Move ``rec`` to ``status`` if the transition table allows it (the same
        status: a progress report); ``InvalidTransition`` otherwise. ``held``: the
        outcome to apply once no descendant is active (an active record keeps the
        one it holds; a terminal one holds none)."""
        rec = self._records.get(rec.task_id, rec)  # (its children counts may have moved)
        if rec.status in TERMINAL or (
            status is not rec.status
            and status not in TRANSITIONS[rec.status]
            # a cancelled parent waits for its descendants, even one never started
            and not (held is not None and status is TaskStatus.CANCELLING)
        ):
            raise InvalidTransition(rec.task_id, rec.status.value, action or status.value)
        at = now if now > rec.updated_at else rec.updated_at
        terminal = status in TERMINAL
        new_stage = (
            None if status is TaskStatus.COMPLETED else (rec.stage if stage is None else stage)
        )
        extra = rec.extra
        if extra is not None or held is not None or (new_stage and new_stage != rec.stage):
            # (the rare fields: a held outcome kept or set, a stage change recorded)
            extra = rec.next_extra(at, status, terminal, held, new_stage)
        new = rec.evolve(
            status=status,
            updated_at=at,
            started_at=at
            if status is TaskStatus.RUNNING and rec.started_at is None
            else rec.started_at,
            finished_at=at if terminal else None,
            progress=1.0
            if status is TaskStatus.COMPLETED
            else (rec.progress if progress is None else progress),
            # A completed task's last stage ("halfway") no longer describes it; a failed
            # or cancelled one keeps it: it says where the work stopped.
            message=None
            if status is TaskStatus.COMPLETED
            else (rec.message if message is None else message),
            result=result if status is TaskStatus.COMPLETED else None,
            error=error if status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
            # as the message: cleared once completed, kept where the work stopped
            stage=new_stage,
            extra=extra,
        )
        tid = new.task_id
        if new.stage != rec.stage:
            self._index_stage(tid, rec.stage, new.stage)
        self._records[tid] = new
        if rec.status is not new.status:
            self._by_status[rec.status].remove(tid)
            self._by_status[new.status].add(tid)
            okey = (rec.task_type, rec.status)
            self._counts[okey] -= 1
            nkey = (new.task_type, new.status)
            self._counts[nkey] = self._counts.get(nkey, 0) + 1
            if terminal:
                self._count_active(new, -1)
                if new.resource_id is not None:
                    key = (new.owner, new.task_type, new.resource_id)
                    if self._active_keys.get(key) == tid:
                        del self._active_keys[key]
                self._expiry.push(new.status, tid, at, self._records.get)
        self._emit(new)
        parent_id = new.parent_id
        if parent_id is not None and rec.status is not new.status:
            self._count_child(parent_id, rec.status, new.status)
            if terminal:
                self._live_delta(parent_id, -1)
        return new

    def expires_at(self, rec: TaskRecord) -> float:
        """When a terminal record expires (TTLs count from ``finished_at``)."""
        assert rec.finished_at is not None
        return rec.finished_at + self._retention.ttl(rec.status)

    def remove(self, task_id: str) -> None:
        """Drop a record (expired, evicted or deleted): its children, if any, stay
        (their ``parent_id`` then names a task that is gone)."""
        rec = self._records.pop(task_id)
        self._index_remove(rec)
        self._dirty[task_id] = None
        self.kept.discard(task_id)
        if rec.parent_id is not None:
            self.forest.unlink(rec.parent_id, task_id)
            self._count_child(rec.parent_id, rec.status, None)

    def delete(self, task_id: str, owner: OwnerScope) -> int:
        """Delete a terminal record and its subtree (all finished); one with an active
        descendant, or active itself, raises ``InvalidTransition``. The number of
        records deleted."""
        rec = self.visible(task_id, owner)
        if rec.status not in DELETE_FROM:
            raise InvalidTransition(rec.task_id, rec.status.value, "delete")
        if self.forest.live(task_id):
            raise InvalidTransition(rec.task_id, ACTIVE_DESCENDANTS, "delete")
        doomed = [task_id, *self.forest.subtree(task_id)]
        for tid in doomed:  # parents first: a parent gone is not recounted
            self.remove(tid)
        self._expiry.compact(len(self._records) - self.active, self._records.get)
        return len(doomed)

    def expire(self, now: float) -> None:
        """Remove every record whose TTL has run out, except one with an active
        descendant (kept until the last of them ends: ``kept``)."""
        for task_id in self._expiry.pop_due(now, self._records.get):
            if self.forest.live(task_id):
                self.kept.add(task_id)
            else:
                self.remove(task_id)

    def next_expiry(self) -> float | None:
        """The earliest instant a record expires, or None."""
        return self._expiry.next_deadline(self._records.get)

    def _emit(self, rec: TaskRecord) -> None:
        self._dirty[rec.task_id] = rec
        self.seq += 1
        self._changed.append((self.seq, rec))

    def _count_active(self, rec: TaskRecord, delta: int) -> None:
        self.active += delta
        if self._quota is not None:
            self._active_by_owner[rec.owner] = self._active_by_owner.get(rec.owner, 0) + delta

    def _oldest_terminal(self) -> str:
        """The oldest finished record without an active descendant."""
        live = self.forest.live
        heads: list[str] = []
        for s in TERMINAL:
            for tid in self._by_status[s]:
                if not live(tid):
                    heads.append(tid)
                    break
        if not heads:
            raise TrackerFull(f"all {self.cap} task slots hold active tasks or their parents")
        return min(heads)

    # --- trees ----------------------------------------------------------------------------

    def _count_child(self, parent_id: str, old: TaskStatus | None, new: TaskStatus | None) -> None:
        """A child of ``parent_id`` moved from ``old`` to ``new`` (None: added, removed):
        the parent's ``children`` counts follow, as a new version of the parent. A
        parent waiting for its children (``await_children``) shows the share of them
        finished as its progress (docs/trees.md)."""
        parent = self._records.get(parent_id)
        if parent is None:
            return
        counts = dict(parent.children)
        if old is not None and counts.get(old.value, 0) > 1:
            counts[old.value] -= 1
        elif old is not None:
            counts.pop(old.value, None)
        if new is not None:
            counts[new.value] = counts.get(new.value, 0) + 1
        progress = parent.progress
        held = parent.held
        if held is not None and held.status is TaskStatus.COMPLETED and counts:
            progress = finished_share(counts)
        extra = (parent.extra or NO_EXTRA).but(
            children=MappingProxyType(counts) if counts else NO_CHILDREN
        )
        new_parent = msgspec.structs.replace(parent, extra=extra, progress=progress)
        self._records[parent_id] = new_parent
        self._emit(new_parent)

    def _live_delta(self, parent_id: str | None, delta: int) -> None:
        """A descendant of ``parent_id`` became active (+1) or ended (-1): every
        ancestor's count follows; one that reaches 0 is ``freed``."""
        forest = self.forest
        records = self._records
        while parent_id is not None:
            if forest.add_live(parent_id, delta) == 0 and delta < 0:
                self.freed.append(parent_id)
            up = records.get(parent_id)
            parent_id = None if up is None else up.parent_id

    # --- indexes --------------------------------------------------------------------------

    def _index_add(self, rec: TaskRecord) -> None:
        tid = rec.task_id
        self._by_status[rec.status].add(tid)
        by_type = self._by_type.get(rec.task_type)
        if by_type is None:
            by_type = self._by_type[rec.task_type] = SortedList()
        by_type.add(tid)
        if rec.owner is not None:
            by_owner = self._by_owner.get(rec.owner)
            if by_owner is None:
                by_owner = self._by_owner[rec.owner] = SortedList()
            by_owner.add(tid)
        if rec.resource_id is not None:
            ids = self._by_resource.get(rec.resource_id)
            if ids is None:
                self._by_resource[rec.resource_id] = tid
            elif isinstance(ids, str):
                self._by_resource[rec.resource_id] = sorted((ids, tid))
            elif ids[-1] < tid:
                ids.append(tid)
            else:
                ids.insert(bisect_left(ids, tid), tid)
        key = (rec.task_type, rec.status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if rec.stage is not None:  # (a record loaded with one)
            self._index_stage(tid, None, rec.stage)

    def _index_remove(self, rec: TaskRecord) -> None:
        tid = rec.task_id
        self._by_status[rec.status].remove(tid)
        by_type = self._by_type[rec.task_type]
        by_type.remove(tid)
        if not by_type:
            del self._by_type[rec.task_type]
        if rec.owner is not None:
            by_owner = self._by_owner[rec.owner]
            by_owner.remove(tid)
            if not by_owner:
                del self._by_owner[rec.owner]
        if rec.resource_id is not None:
            ids = self._by_resource[rec.resource_id]
            if isinstance(ids, str):
                del self._by_resource[rec.resource_id]
            else:
                del ids[bisect_left(ids, tid)]
                if len(ids) == 1:
                    self._by_resource[rec.resource_id] = ids[0]
        key = (rec.task_type, rec.status)
        self._counts[key] -= 1
        if rec.stage is not None:
            self._index_stage(tid, rec.stage, None)

    def _index_stage(self, tid: str, old: str | None, new: str | None) -> None:
        if old is not None:
            ids = self._by_stage[old]
            ids.remove(tid)
            if not ids:
                del self._by_stage[old]
        if new is not None:
            ids = self._by_stage.get(new)
            if ids is None:
                ids = self._by_stage[new] = SortedList()
            ids.add(tid)

    # --- listing --------------------------------------------------------------------------

    def list_page(
        self,
        *,
        statuses: frozenset[TaskStatus] | None = None,
        task_type: str | None = None,
        resource_id: str | None = None,
        owner: OwnerScope = ANY_OWNER,
        limit: int = 50,
        before: str | None = None,
        stage: str | None = None,
        parent_id: str | None = None,
    ) -> Page:
        """One page of records, newest first, from the smallest index that covers a
        filter; ``before`` is the cursor (ids sort in creation order)."""
        out: list[TaskRecord] = []
        records = self._records
        candidates = self._candidates(statuses, task_type, resource_id, owner, before)
        if parent_id is not None:
            children = self.forest.children(parent_id)
            if children is None:
                return Page((), None)
            candidates = _desc(children, before)
        if stage is not None:
            by_stage = self._by_stage.get(stage)
            if by_stage is None:
                return Page((), None)
            if len(by_stage) < len(records) // 4:  # (else the other index is as good)
                candidates = _desc(by_stage, before)
        for tid in candidates:
            rec = records[tid]
            if stage is not None and rec.stage != stage:
                continue
            if parent_id is not None and rec.parent_id != parent_id:
                continue
            if owner is not ANY_OWNER and rec.owner != owner:
                continue
            if statuses is not None and rec.status not in statuses:
                continue
            if task_type is not None and rec.task_type != task_type:
                continue
            if resource_id is not None and rec.resource_id != resource_id:
                continue
            if len(out) == limit:
                return Page(tuple(out), out[-1].task_id)
            out.append(rec)
        return Page(tuple(out), None)

    def _candidates(
        self,
        statuses: frozenset[TaskStatus] | None,
        task_type: str | None,
        resource_id: str | None,
        owner: OwnerScope,
        before: str | None,
    ) -> Iterator[str]:
        """Ids, newest first, from the smallest index that covers a filter."""
        options: list[tuple[int, Callable[[], Iterator[str]]]] = []
        if statuses is not None:
            lists = [self._by_status[s] for s in statuses]
            options.append((sum(len(x) for x in lists), lambda: _merge_desc(lists, before)))
        if task_type is not None:
            by_type = self._by_type.get(task_type)
            if by_type is None:
                return iter(())
            options.append((len(by_type), lambda: _desc(by_type, before)))
        if resource_id is not None:
            found = self._by_resource.get(resource_id)
            if found is None:
                return iter(())
            ids = [found] if isinstance(found, str) else found
            options.append((len(ids), lambda: _list_desc(ids, before)))
        if isinstance(owner, str):
            by_owner = self._by_owner.get(owner)
            if by_owner is None:
                return iter(())
            options.append((len(by_owner), lambda: _desc(by_owner, before)))
        if options:
            return min(options, key=lambda o: o[0])[1]()
        if before is None:
            return reversed(self._records.keys())
        return _merge_desc(list(self._by_status.values()), before)


def _desc(ids: SortedList, before: str | None) -> Iterator[str]:
    if before is None:
        rev: Iterator[str] = reversed(ids)
        return rev
    it: Iterator[str] = ids.irange(maximum=before, inclusive=(True, False), reverse=True)
    return it


def _list_desc(ids: list[str], before: str | None) -> Iterator[str]:
    end = len(ids) if before is None else bisect_left(ids, before)
    for i in range(end - 1, -1, -1):
        yield ids[i]


def _merge_desc(lists: list[SortedList], before: str | None) -> Iterator[str]:
    if len(lists) == 1:
        return _desc(lists[0], before)
    return heapq.merge(*(_desc(x, before) for x in lists if x), reverse=True)
