"""Model check of task trees (docs/trees.md): random forests of tasks under random
creates, starts, completes (some parents await their children), fails, cancels,
confirms, deletes, and clock moves past the TTLs, with the tree's invariants checked
after every step against what the tracker itself answers:

- a child's parent is its owner's, and the parent's ``children`` counts are exactly
  its children held, by status; ``list(parent_id=)`` lists exactly them;
- no active task under a cancelled ancestor, and every ancestor of an active task is
  still held (retention never removes a parent whose descendant is active);
- a task whose own work ended (a confirmed cancel, an awaited complete) is terminal
  as soon as no descendant is active;
- after a delete, no task of the deleted subtree is left (no orphan).
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import taskd
from taskd import TaskStatus as S

from ..conftest import Engine
from .conftest import REDIS, TrackerMachine, model_settings

T = TypeVar("T")
OWNERS = st.sampled_from([None, "alice"])
ACTIVE = {S.PENDING, S.RUNNING, S.CANCELLING}
TTL = 10.0


class TreeModel(TrackerMachine):
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__(taskd.Retention(completed_ttl=TTL, failed_ttl=TTL, cancelled_ttl=TTL))
        #: Every id created (held or not), its owner, and whether its own work ended
        #: with a held outcome (an awaited complete, or a cancel confirmed).
        self.ids: list[str] = []
        self.owner: dict[str, str | None] = {}
        self.own_work_ended: set[str] = set()
        #: Ids deleted with a subtree: none of them may be held afterwards.
        self.deleted: set[str] = set()

    def records(self) -> dict[str, taskd.TaskRecord]:
        found = self.run(self.tracker.list(limit=200))
        return {r.task_id: r for r in found}

    def attempt(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a command; a refusal the rules allow (not found, invalid) is None."""
        try:
            return self.run(coro)
        except (taskd.TaskNotFound, taskd.InvalidTransition):
            return None

    # --- rules -----------------------------------------------------------------

    @initialize(target=tasks, owner=OWNERS, awaits=st.booleans(), deep=st.booleans())
    def a_tree(self, owner: str | None, awaits: bool, deep: bool) -> Any:
        """Every run starts from a tree (a root, two children, maybe a grandchild)."""
        create = self.tracker.create
        root = self.run(create("t", owner=owner, await_children=awaits))
        kids = [self.run(create("t", owner=owner, parent_id=root.task_id)) for _ in range(2)]
        made = [root, *kids]
        if deep:
            made.append(self.run(create("t", owner=owner, parent_id=kids[0].task_id)))
        for rec in made:
            self.ids.append(rec.task_id)
            self.owner[rec.task_id] = owner
        return multiple(*(r.task_id for r in made))

    @rule(target=tasks, owner=OWNERS, awaits=st.booleans())
    def create_root(self, owner: str | None, awaits: bool) -> str:
        rec = self.run(self.tracker.create("t", owner=owner, await_children=awaits))
        self.ids.append(rec.task_id)
        self.owner[rec.task_id] = owner
        return rec.task_id

    @rule(target=tasks, parent=tasks, awaits=st.booleans(), other_owner=st.booleans())
    def create_child(self, parent: str, awaits: bool, other_owner: bool) -> str:
        owner = self.owner[parent]
        if other_owner:
            owner = "bob"  # another owner's parent: as a missing one
            with pytest.raises(taskd.TaskNotFound):
                self.run(self.tracker.create("t", owner=owner, parent_id=parent))
            return parent
        before = self.run(self.tracker.get(parent))
        try:
            rec = self.run(
                self.tracker.create("t", owner=owner, parent_id=parent, await_children=awaits)
            )
        except taskd.TaskNotFound:
            assert before is None
            return parent
        except taskd.InvalidTransition:
            assert before is not None
            assert before.status not in ACTIVE or before.status is S.CANCELLING
            return parent
        assert before is not None and before.status in {S.PENDING, S.RUNNING}
        assert rec.parent_id == parent
        self.ids.append(rec.task_id)
        self.owner[rec.task_id] = owner
        return rec.task_id

    @rule(tid=tasks)
    def start(self, tid: str) -> None:
        self.attempt(self.tracker.start(tid))

    @rule(tid=tasks)
    def complete(self, tid: str) -> None:
        self.attempt(self.tracker.start(tid))  # (a pending task cannot complete)
        rec = self.attempt(self.tracker.complete(tid, {"n": 1}))
        if rec is not None and rec.status in ACTIVE:
            assert rec.await_children and rec.result is None
            self.own_work_ended.add(tid)

    @rule(tid=tasks)
    def fail(self, tid: str) -> None:
        self.attempt(self.tracker.fail(tid, "boom"))

    @rule(tid=tasks, confirm=st.booleans())
    def cancel(self, tid: str, confirm: bool) -> None:
        before = self.run(self.tracker.get(tid))
        rec = self.attempt(self.tracker.cancel(tid, confirm=confirm))
        if rec is None:
            return
        assert before is not None
        if before.status in {S.CANCELLING, S.CANCELLED} and not confirm:
            assert rec.status is before.status  # idempotent
        if confirm or before.status is S.PENDING or tid in self.own_work_ended:
            self.own_work_ended.add(tid)

    @rule(tid=tasks)
    def delete(self, tid: str) -> None:
        held = self.records()
        if tid not in held:
            return
        subtree = self.subtree(tid, held)
        try:
            self.run(self.tracker.delete(tid))
        except taskd.InvalidTransition:
            assert held[tid].status in ACTIVE or any(held[d].status in ACTIVE for d in subtree)
            return
        self.deleted |= {tid, *subtree}

    @rule(seconds=st.sampled_from([1.0, 11.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: bool(self.ids))
    @rule()
    def read_everything(self) -> None:
        for tid in self.ids:
            self.run(self.tracker.get(tid))  # reads also let due timers fire

    # --- invariants ------------------------------------------------------------

    @staticmethod
    def subtree(tid: str, held: dict[str, taskd.TaskRecord]) -> set[str]:
        out: set[str] = set()
        frontier = {tid}
        while frontier:
            frontier = {r.task_id for r in held.values() if r.parent_id in frontier}
            out |= frontier
        return out

    @invariant()
    def children_counts_and_listings_are_exact(self) -> None:
        held = self.records()
        for rec in held.values():
            kids = [r for r in held.values() if r.parent_id == rec.task_id]
            counts: dict[str, int] = {}
            for kid in kids:
                counts[kid.status.value] = counts.get(kid.status.value, 0) + 1
                assert kid.owner == rec.owner
            assert dict(rec.children) == counts, rec.task_id
            listed = self.run(self.tracker.list(parent_id=rec.task_id, limit=200))
            assert [r.task_id for r in listed] == sorted((k.task_id for k in kids), reverse=True)

    @invariant()
    def nothing_active_under_a_cancelled_or_missing_ancestor(self) -> None:
        held = self.records()
        for rec in held.values():
            if rec.status not in ACTIVE:
                continue
            up = rec.parent_id
            while up is not None:
                assert up in held, f"{rec.task_id}: ancestor {up} gone while it is active"
                assert held[up].status is not S.CANCELLED, f"{rec.task_id} under {up}"
                up = held[up].parent_id

    @invariant()
    def a_cancel_reaches_every_active_descendant(self) -> None:
        """A cancelling or cancelled task takes no new child, and its cancel cascaded:
        every active task under it is cancelling."""
        held = self.records()
        for rec in held.values():
            if rec.status in (S.CANCELLING, S.CANCELLED):
                for d in self.subtree(rec.task_id, held):
                    assert held[d].status not in (S.PENDING, S.RUNNING), (rec, held[d])

    @invariant()
    def an_ended_task_is_terminal_once_its_descendants_are(self) -> None:
        held = self.records()
        for tid in self.own_work_ended & held.keys():
            rec = held[tid]
            if not any(held[d].status in ACTIVE for d in self.subtree(tid, held)):
                assert rec.status not in ACTIVE, rec

    @invariant()
    def a_deleted_subtree_is_gone(self) -> None:
        held = self.records()
        assert not (self.deleted & held.keys())


TreeModel.TestCase.settings = model_settings(300, 30)
test_tree_model = TreeModel.TestCase


class RedisTreeModel(TreeModel):
    """The same checks on a shared task space on a real Redis (a fresh key prefix
    per example; time from the fake clock: the caller's)."""

    def engine(self) -> Engine:
        return {"redis": REDIS[0], "redis_prefix": f"tree-{uuid.uuid4().hex}:"}


RedisTreeModel.TestCase.settings = model_settings(60, 30)
test_tree_model_on_redis = RedisTreeModel.TestCase
