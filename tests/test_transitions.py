"""Every allowed and every forbidden transition, driven through the public API, on
every engine: memory, SQLite and Redis (docs/architecture.md: the rules are written
once, in taskd/engine/rules.py, and the Redis script reads tables made from them)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import taskd
from taskd import TaskStatus as S
from taskd.testing import FakeClock

from .redis_server import RedisServer
from .test_models import ALL, ALLOWED


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def tracker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[taskd.Tracker]:
    """A tracker on each engine (this module's rule tests run on all three)."""
    if request.param == "memory":
        t = taskd.Tracker()
    elif request.param == "sqlite":
        t = taskd.Tracker(store=taskd.SQLiteStore(tmp_path / "t.db"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        t = taskd.Tracker(redis=server.url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}:")
    async with t:
        yield t


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
    if target is S.CANCELLING:
        return await t.cancel(tid)
    if target is S.CANCELLED:
        return await t.cancel(tid, confirm=True)  # (the worker's acknowledgement)
    raise AssertionError(target)


# cancel() picks cancelling or cancelled by itself (confirm=True: cancelled), so
# through the public API it can express only these moves (or a refusal on a terminal
# task); the table test covers the rest of the table.
VIA_CANCEL = {
    S.RUNNING: {S.CANCELLING, S.CANCELLED},
    S.PENDING: {S.CANCELLED},
    S.CANCELLING: {S.CANCELLED},
}
PAIRS = [
    (a, b)
    for a in ALL
    for b in ALL
    if b is not S.PENDING
    and a is not b
    and (b not in (S.CANCELLING, S.CANCELLED) or a.is_terminal or b in VIA_CANCEL.get(a, ()))
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
    elif source is S.CANCELLED and target in (S.CANCELLING, S.CANCELLED):
        # cancel is idempotent on a cancelled task: the record as it is, no error
        assert await _move(tracker, tid, target) == before
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
    ):
        with pytest.raises(taskd.InvalidTransition):
            await attempt
    if terminal is S.CANCELLED:
        # idempotent (docs/http-api.md): a retried cancel answers the record as it is
        assert await tracker.cancel(tid) == before
        assert await tracker.cancel(tid, confirm=True) == before
    else:
        for confirm in (False, True):
            with pytest.raises(taskd.InvalidTransition):
                await tracker.cancel(tid, confirm=confirm)
    assert await tracker.get(tid) == before


@pytest.mark.parametrize("source", [s for s in ALL if s is not S.PENDING], ids=str)
async def test_start_only_from_pending(tracker: taskd.Tracker, source: S) -> None:
    """A running task is not started twice (nor any but a pending one)."""
    tid = await _reach(tracker, source)
    before = await tracker.get(tid)
    with pytest.raises(taskd.InvalidTransition):
        await tracker.start(tid)
    assert await tracker.get(tid) == before


@pytest.mark.parametrize("source", [S.PENDING, S.RUNNING, S.CANCELLING], ids=str)
async def test_active_records_cannot_be_deleted(tracker: taskd.Tracker, source: S) -> None:
    tid = await _reach(tracker, source)
    with pytest.raises(taskd.InvalidTransition):
        await tracker.delete(tid)
    assert await tracker.get(tid) is not None


async def test_cancel_of_a_spawned_task_asks_then_its_runner_records_it(
    tracker: taskd.Tracker,
) -> None:
    gate = asyncio.Event()
    handle = await tracker.spawn(gate.wait(), task_type="x")
    asked = await tracker.cancel(handle.task_id)
    assert asked.status in (S.CANCELLING, S.CANCELLED)
    with pytest.raises(asyncio.CancelledError):
        await handle
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.status is S.CANCELLED
    assert await tracker.cancel(handle.task_id) == rec  # idempotent once cancelled


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
    again = await tracker.cancel(tid)  # a client's retry: nothing changes
    assert again == seen
    done = await tracker.cancel(tid, confirm=True)  # the worker acknowledges
    assert done.status is S.CANCELLED and done.error
    assert await tracker.cancel(tid, confirm=True) == done  # and may retry that too


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
