"""Every allowed and every forbidden transition, driven through the public API."""

from __future__ import annotations

import asyncio

import pytest

import taskd
from taskd import TaskStatus as S
from taskd.testing import FakeClock

from .test_models import ALL, ALLOWED


async def _reach(t: taskd.Tracker, status: S) -> str:
    """An external task brought to ``status`` by public calls."""
    rec = await t.create("x")
    tid = rec.task_id
    if status is S.PENDING:
        return tid
    if status is S.CANCELLED:
        await t.cancel(tid)
        return tid
    await t.start(tid)
    if status is S.COMPLETED:
        await t.complete(tid, {"v": 1})
    elif status is S.FAILED:
        await t.fail(tid, "boom")
    elif status is S.CANCELLING:
        await t.cancel(tid)
    return tid


async def _move(t: taskd.Tracker, tid: str, target: S) -> taskd.TaskRecord:
    if target is S.RUNNING:
        return await t.start(tid)
    if target is S.COMPLETED:
        return await t.complete(tid, {"done": True})
    if target is S.FAILED:
        return await t.fail(tid, "it broke")
    if target in (S.CANCELLING, S.CANCELLED):
        return await t.cancel(tid)
    raise AssertionError(target)


# cancel() picks cancelling or cancelled by itself, so through the public API it can
# express only these moves (or a refusal on a terminal task); the table test covers
# the rest of the table.
VIA_CANCEL = {S.RUNNING: S.CANCELLING, S.PENDING: S.CANCELLED, S.CANCELLING: S.CANCELLED}
PAIRS = [
    (a, b)
    for a in ALL
    for b in ALL
    if b is not S.PENDING
    and a is not b
    and (b not in (S.CANCELLING, S.CANCELLED) or a.is_terminal or VIA_CANCEL.get(a) is b)
]


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=lambda s: s.value)
async def test_transition(tracker: taskd.Tracker, source: S, target: S) -> None:
    tid = await _reach(tracker, source)
    before = await tracker.get(tid)
    assert before is not None and before.status is source
    if (source, target) in ALLOWED:
        after = await _move(tracker, tid, target)
        assert after.status is target
        assert after.updated_at >= before.updated_at
        if target.is_terminal:
            assert after.finished_at is not None
    else:
        with pytest.raises(taskd.InvalidTransition):
            await _move(tracker, tid, target)
        assert await tracker.get(tid) == before  # unchanged


@pytest.mark.parametrize("terminal", [S.COMPLETED, S.FAILED, S.CANCELLED])
async def test_terminal_records_never_change(tracker: taskd.Tracker, terminal: S) -> None:
    tid = await _reach(tracker, terminal)
    before = await tracker.get(tid)
    for attempt in (
        tracker.start(tid),
        tracker.progress(tid, 0.5, message="late"),
        tracker.complete(tid, {"late": True}),
        tracker.fail(tid, "late failure"),
        tracker.cancel(tid),
    ):
        with pytest.raises(taskd.InvalidTransition):
            await attempt
    assert await tracker.get(tid) == before


async def test_progress_allowed_while_active(tracker: taskd.Tracker) -> None:
    for status in (S.PENDING, S.RUNNING, S.CANCELLING):
        tid = await _reach(tracker, status)
        rec = await tracker.progress(tid, 0.25, message="step")
        assert (rec.status, rec.progress, rec.message) == (status, 0.25, "step")


async def test_external_cancel_asks_then_worker_confirms(tracker: taskd.Tracker) -> None:
    tid = await _reach(tracker, S.RUNNING)
    asked = await tracker.cancel(tid)
    assert asked.status is S.CANCELLING
    seen = await tracker.progress(tid, 0.9)
    assert seen.status is S.CANCELLING  # the worker learns on its next report
    done = await tracker.cancel(tid)
    assert done.status is S.CANCELLED and done.error


async def test_cancelling_worker_may_still_complete(tracker: taskd.Tracker) -> None:
    tid = await _reach(tracker, S.CANCELLING)
    rec = await tracker.complete(tid, 42)
    assert rec.status is S.COMPLETED and rec.result == 42


async def test_updated_at_never_goes_backwards(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock) as t:
        rec = await t.create("x")
        clock.advance(-100)  # the wall clock steps back
        rec2 = await t.start(rec.task_id)
        assert rec2.updated_at >= rec.updated_at
        assert rec2.started_at is not None and rec2.started_at >= rec.created_at


async def test_spawned_task_rejects_external_completion(tracker: taskd.Tracker) -> None:
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 1

    handle = await tracker.spawn(work(), task_type="x")
    with pytest.raises(taskd.InvalidTransition):
        await tracker.complete(handle.task_id, 2)
    gate.set()
    assert await handle == 1
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.result == 1
