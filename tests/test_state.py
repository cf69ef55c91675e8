"""``TaskState`` on its own (docs/architecture.md): records, indexes, listing, eviction
and transitions, with no actor, no asyncio and an explicit clock."""

from __future__ import annotations

from typing import Any

import pytest

import taskd
from taskd import TaskStatus as S
from taskd._models import TaskRecord
from taskd.engine.state import TaskState, new_spec

NOW = 1_800_000_000.0


def make(state: TaskState, task_type: str = "t", resource: str | None = None,
         owner: str | None = None, now: float = NOW) -> TaskRecord:  # fmt: skip
    spec = new_spec({}, owner, False, None, None)

    def build(task_id: str, at: float) -> TaskRecord:
        return TaskRecord(task_id, task_type, S.PENDING, resource, at, at, spec=spec)

    return state.insert(task_type, resource, owner, now, build)


def page(state: TaskState, **kw: Any) -> list[str]:
    return [r.task_id for r in state.list_page(**kw).records]


def test_ids_sort_in_creation_order_and_changes_come_out_once() -> None:
    state = TaskState(taskd.Retention(), first_seq=100)
    a, b = make(state), make(state)
    assert a.task_id < b.task_id
    dirty, changed = state.take_changes()
    assert set(dirty) == {a.task_id, b.task_id}
    assert [seq for seq, _ in changed] == [101, 102]
    assert state.take_changes() == ({}, [])


def test_dedup_quota_and_cap() -> None:
    state = TaskState(taskd.Retention(max_tasks=3, max_active_per_owner=2), first_seq=0)
    first = make(state, resource="r", owner="a")
    with pytest.raises(taskd.TaskConflict) as conflict:
        make(state, resource="r", owner="a")
    assert conflict.value.task_id == first.task_id
    make(state, resource="r", owner="b")  # dedup is per owner
    make(state, owner="a")
    with pytest.raises(taskd.QuotaExceeded):
        make(state, owner="a")
    with pytest.raises(taskd.TrackerFull):
        make(state, owner="c")  # three active tasks fill the cap of three
    state.transition(first, S.CANCELLED, NOW + 1)
    newest = make(state, owner="c")  # evicts the terminal one
    assert state.get(first.task_id) is None and state.get(newest.task_id) is not None


def test_transitions_follow_the_table_and_leave_records_unchanged() -> None:
    state = TaskState(taskd.Retention(), first_seq=0)
    rec = make(state)
    with pytest.raises(taskd.InvalidTransition):
        state.transition(rec, S.COMPLETED, NOW)  # pending -> completed is not allowed
    assert state.get(rec.task_id) is rec
    running = state.transition(rec, S.RUNNING, NOW + 1)
    done = state.transition(running, S.COMPLETED, NOW + 2, result={"n": 1})
    assert (done.started_at, done.finished_at, done.result) == (NOW + 1, NOW + 2, {"n": 1})
    with pytest.raises(taskd.InvalidTransition):
        state.transition(done, S.FAILED, NOW + 3)
    assert state.counts() == {("t", S.COMPLETED): 1} and state.active == 0


def test_listing_filters_and_pages_newest_first() -> None:
    state = TaskState(taskd.Retention(), first_seq=0)
    ids = [make(state, task_type="a" if i % 2 else "b", owner="o").task_id for i in range(7)]
    assert page(state) == ids[::-1]
    assert page(state, task_type="a") == [i for n, i in enumerate(ids) if n % 2][::-1]
    first = page(state, limit=3)
    assert page(state, limit=3, before=first[-1]) == ids[::-1][3:6]
    assert page(state, owner="someone else") == []
    assert page(state, statuses=frozenset({S.RUNNING})) == []


def test_expiry_counts_from_finished_at() -> None:
    state = TaskState(taskd.Retention(completed_ttl=10), first_seq=0)
    rec = state.transition(make(state), S.RUNNING, NOW)
    done = state.transition(rec, S.COMPLETED, NOW + 5)
    assert state.next_expiry() == state.expires_at(done) == NOW + 15
    state.expire(NOW + 14)
    assert state.get(done.task_id) is not None
    state.expire(NOW + 15)
    assert state.get(done.task_id) is None and len(state) == 0
