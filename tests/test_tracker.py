"""The Tracker API (docs/embedding.md, docs/architecture.md), against a real actor."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import TypedDict

import pytest

import taskd
from taskd import TaskStatus as S
from taskd.actor.subscription import Subscription
from taskd.testing import FakeClock, eventually

from .redis_server import RedisServer


class RecordingStore(taskd.MemoryStore):
    """A store (the public ``Store`` protocol) that keeps what the actor commits, so a
    test sees each write as it lands rather than by asking the actor."""

    persistent = True

    def __init__(self) -> None:
        self.seen: dict[str, taskd.TaskRecord] = {}
        self.deleted: set[str] = set()

    async def write(self, upserts: Collection[taskd.TaskRecord], deletes: Collection[str]) -> None:
        for r in upserts:
            self.seen[r.task_id] = r
        self.deleted.update(deletes)


# --- spawn -----------------------------------------------------------------------


async def test_spawn_runs_and_records_the_return_value(tracker: taskd.Tracker) -> None:
    async def work() -> dict[str, int]:
        taskd.report_progress(0.5, "half way")
        await asyncio.sleep(0)
        return {"docs": 3}

    handle = await tracker.spawn(work(), task_type="session_commit", resource_id="s1")
    assert handle.record.status is S.RUNNING  # its runner is already scheduled
    assert await handle == {"docs": 3}
    rec = await tracker.get(handle.task_id)
    assert rec is not None
    assert rec.status is S.COMPLETED and rec.result == {"docs": 3}
    # completed: progress 1.0, and the last stage message no longer applies
    assert rec.message is None and rec.progress == 1.0
    assert rec.started_at is not None and rec.finished_at is not None
    assert rec.created_at <= rec.started_at <= rec.finished_at == rec.updated_at


class Options(TypedDict, total=False):
    """What picks an engine (``Tracker`` takes these)."""

    store: taskd.Store
    redis: str
    redis_prefix: str


@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Options:
    """``Tracker`` options for each engine: memory, SQLite, a shared space on Redis."""
    if request.param == "sqlite":
        return {"store": taskd.SQLiteStore(str(tmp_path / "tasks.db"))}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"redis": server.url, "redis_prefix": f"test-{uuid.uuid4().hex[:12]}:"}
    return {}


async def test_handle_record_is_the_terminal_record_once_awaited(any_store: Options) -> None:
    """After ``await handle`` returned or raised, ``handle.record`` says how the task
    ended, as the tracker stored it (docs/architecture.md), on every engine."""
    gate = asyncio.Event()

    async def ok() -> int:
        return 3

    async def boom() -> None:
        raise ValueError("password=hunter2 refused")

    async def stuck() -> None:
        await gate.wait()

    async with taskd.Tracker(close_timeout=0.5, **any_store) as tracker:
        done = await tracker.spawn(ok(), task_type="x")
        created = done.record
        assert created.status is S.RUNNING
        assert await done == 3
        assert done.record.status is S.COMPLETED and done.record.result == 3
        assert done.record.finished_at is not None
        assert done.record == await tracker.get(done.task_id)

        failed = await tracker.spawn(boom(), task_type="x")
        with pytest.raises(ValueError):
            await failed
        assert failed.record.status is S.FAILED
        assert failed.record.error == "ValueError: password=[REDACTED] refused"

        cancelled = await tracker.spawn(stuck(), task_type="x")
        await cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert cancelled.record.status is S.CANCELLED
        assert cancelled.record == await tracker.get(cancelled.task_id)

        timed_out = await tracker.spawn(stuck(), task_type="x", timeout=0.05)
        with pytest.raises(TimeoutError):
            await timed_out
        assert timed_out.record.status is S.FAILED
        assert timed_out.record.error is not None and "timeout" in timed_out.record.error
        assert repr(timed_out) == f"<TaskHandle {timed_out.task_id} x>"


async def test_spawn_failure_is_redacted_and_reraised(tracker: taskd.Tracker) -> None:
    async def work() -> None:
        raise ConnectionError("connect to postgres://app:hunter2@db/x failed")

    handle = await tracker.spawn(work(), task_type="x")
    with pytest.raises(ConnectionError):
        await handle
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.status is S.FAILED
    assert rec.error == "ConnectionError: connect to postgres://app:[REDACTED]@db/x failed"
    assert rec.result is None


async def test_spawn_non_json_result_fails_clearly(tracker: taskd.Tracker) -> None:
    async def work() -> object:
        return {"when": object()}

    handle = await tracker.spawn(work(), task_type="x")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        await handle
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.status is S.FAILED
    assert rec.error is not None and "not JSON-serialisable" in rec.error


async def test_spawn_timeout_fails_the_task(tracker: taskd.Tracker) -> None:
    handle = await tracker.spawn(asyncio.sleep(30), task_type="x", timeout=0.05)
    with pytest.raises(TimeoutError):
        await handle
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.status is S.FAILED
    assert rec.error is not None and rec.error.startswith("timeout")


async def test_cancel_running_spawned_task(tracker: taskd.Tracker) -> None:
    started = asyncio.Event()
    unwound = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            unwound.set()

    handle = await tracker.spawn(work(), task_type="x")
    await started.wait()
    rec = await tracker.cancel(handle.task_id)
    assert rec.status is S.CANCELLING
    with pytest.raises(asyncio.CancelledError):
        await handle
    assert unwound.is_set()
    final = await tracker.get(handle.task_id)
    assert final is not None and final.status is S.CANCELLED and final.error


async def test_cancel_right_after_spawn_stops_it_at_first_await(
    tracker: taskd.Tracker,
) -> None:
    gate = asyncio.Event()
    passed_first_await = False

    async def work() -> None:
        nonlocal passed_first_await
        await gate.wait()
        passed_first_await = True

    handle = await tracker.spawn(work(), task_type="x")
    await tracker.cancel(handle.task_id)  # pending or just started: either way it stops
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await handle
    final = await tracker.get(handle.task_id)
    assert final is not None and final.status is S.CANCELLED
    assert not passed_first_await


async def test_spawn_keeps_a_strong_reference(tracker: taskd.Tracker) -> None:
    import gc
    import weakref

    # The coroutine waits on a future nothing else holds: without the tracker's own
    # reference to the runner task, task and future form a garbage cycle.
    holder: weakref.WeakValueDictionary[str, asyncio.Future[str]] = weakref.WeakValueDictionary()

    async def work() -> str:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        holder["fut"] = fut
        return await fut

    handle = await tracker.spawn(work(), task_type="x")
    task_id = handle.task_id
    await eventually(lambda: "fut" in holder)  # the coroutine runs, awaiting its future
    del handle
    await tracker.get("other")  # the actor moves on from the batch that held the spawn
    gc.collect()
    fut = holder.get("fut")
    assert fut is not None  # the runner survived the collection
    fut.set_result("alive")
    del fut
    rec = await tracker.wait(task_id, timeout=5)
    assert rec.result == "alive"


async def test_report_progress_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="spawn"):
        taskd.report_progress(0.5)


async def test_report_progress_checks_its_arguments(tracker: taskd.Tracker) -> None:
    errors: list[type[BaseException]] = []

    async def work() -> None:
        for bad in (1.5, -0.1, float("nan"), "half", True):
            try:
                taskd.report_progress(bad)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                errors.append(type(exc))

    await (await tracker.spawn(work(), task_type="x"))
    assert errors == [ValueError, ValueError, ValueError, TypeError, TypeError]


async def test_spawn_passes_the_callers_context_variables(tracker: taskd.Tracker) -> None:
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("req-42")

    async def work() -> str:
        return request_id.get()

    assert await (await tracker.spawn(work(), task_type="x")) == "req-42"


# --- dedup -----------------------------------------------------------------------


async def test_thousand_concurrent_spawns_on_one_key_one_wins(tracker: taskd.Tracker) -> None:
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    results = await asyncio.gather(
        *(tracker.spawn(work(), task_type="commit", resource_id="s1") for _ in range(1000)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, taskd.TaskHandle)]
    conflicts = [r for r in results if isinstance(r, taskd.TaskConflict)]
    assert len(winners) == 1 and len(conflicts) == 999
    assert {c.task_id for c in conflicts} == {winners[0].task_id}
    gate.set()
    await winners[0]
    # Once the holder is terminal the key is free again.
    again = await tracker.spawn(work(), task_type="commit", resource_id="s1")
    await again


async def test_dedup_key_includes_owner_and_type(tracker: taskd.Tracker) -> None:
    a = await tracker.create("commit", resource_id="s1", owner="alice")
    await tracker.create("commit", resource_id="s1", owner="bob")
    await tracker.create("reindex", resource_id="s1", owner="alice")
    await tracker.create("commit", owner="alice")  # no resource: no dedup
    await tracker.create("commit", owner="alice")
    with pytest.raises(taskd.TaskConflict) as info:
        await tracker.create("commit", resource_id="s1", owner="alice")
    assert info.value.task_id == a.task_id


# --- list ------------------------------------------------------------------------


async def test_list_is_newest_first_with_filters(tracker: taskd.Tracker) -> None:
    ids = [
        (await tracker.create(f"t{i % 2}", resource_id=f"r{i % 3}", owner=f"o{i}")).task_id
        for i in range(12)
    ]
    await tracker.start(ids[3])
    await tracker.fail(ids[3], "x")
    await tracker.cancel(ids[5])
    everything = await tracker.list(limit=200)
    assert [r.task_id for r in everything] == ids[::-1]
    assert [r.task_id for r in await tracker.list(status="failed")] == [ids[3]]
    both = await tracker.list(status=["failed", S.CANCELLED])
    assert [r.task_id for r in both] == [ids[5], ids[3]]
    t1 = await tracker.list(task_type="t1")
    assert [r.task_id for r in t1] == [i for n, i in enumerate(ids) if n % 2][::-1]
    r0 = await tracker.list(resource_id="r0", task_type="t0")
    assert [r.task_id for r in r0] == [i for n, i in enumerate(ids) if n % 6 == 0][::-1]
    assert await tracker.list(task_type="nope") == []
    assert len(await tracker.list(limit=5)) == 5


async def test_list_pages_stay_exact_while_tasks_are_created(tracker: taskd.Tracker) -> None:
    ids = [(await tracker.create("x")).task_id for _ in range(25)]
    seen: list[str] = []
    page = await tracker.list_page(limit=10)
    while True:
        seen.extend(r.task_id for r in page.records)
        await tracker.create("x")  # newer tasks must not shift later pages
        if page.next_cursor is None:
            break
        page = await tracker.list_page(limit=10, cursor=page.next_cursor)
    assert seen == ids[::-1]


async def test_list_same_instant_later_created_first(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock) as t:
        a = await t.create("x")
        b = await t.create("x")
        assert b.created_at >= a.created_at
        assert [r.task_id for r in await t.list()] == [b.task_id, a.task_id]


# --- wait / watch ----------------------------------------------------------------


async def test_ten_thousand_waiters_all_woken(tracker: taskd.Tracker) -> None:
    rec = await tracker.create("x")
    await tracker.start(rec.task_id)
    waiters = [asyncio.ensure_future(tracker.wait(rec.task_id)) for _ in range(10_000)]

    async def all_parked() -> bool:
        return (await tracker.stats())["waiters"] == 10_000

    await eventually(all_parked)
    assert not any(w.done() for w in waiters)
    await tracker.complete(rec.task_id, "ok")
    done = await asyncio.wait_for(asyncio.gather(*waiters), timeout=30)
    assert len(done) == 10_000
    assert all(r.status is S.COMPLETED and r.result == "ok" for r in done)


async def test_wait_timeout_raises_and_poll_returns_latest(tracker: taskd.Tracker) -> None:
    rec = await tracker.create("x")
    with pytest.raises(TimeoutError):
        await tracker.wait(rec.task_id, timeout=0.05)
    await tracker.progress(rec.task_id, 0.4)
    latest = await tracker.poll(rec.task_id, 0.05)
    assert latest.status is S.PENDING and latest.progress == 0.4


async def test_wait_unknown_task(tracker: taskd.Tracker) -> None:
    with pytest.raises(taskd.TaskNotFound):
        await tracker.wait("nope", timeout=1)


async def test_cancelled_waiter_is_forgotten(tracker: taskd.Tracker) -> None:
    rec = await tracker.create("x")
    w = asyncio.ensure_future(tracker.wait(rec.task_id))

    async def waiters(n: int) -> bool:
        return (await tracker.stats())["waiters"] == n

    await eventually(lambda: waiters(1))
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert await waiters(0)  # stats() queues behind the Unwait the cancel sent


async def test_watch_yields_each_change_and_ends(tracker: taskd.Tracker) -> None:
    rec = await tracker.create("x")
    seen: list[tuple[S, float | None]] = []

    async def watcher() -> None:
        async for r in tracker.watch(rec.task_id):
            seen.append((r.status, r.progress))

    w = asyncio.ensure_future(watcher())

    async def subscribed() -> bool:
        return (await tracker.stats())["subscriptions"] == 1

    await eventually(subscribed)
    await tracker.start(rec.task_id)
    await tracker.progress(rec.task_id, 0.5)
    await tracker.complete(rec.task_id, 1)
    await asyncio.wait_for(w, 5)
    assert seen == [
        (S.PENDING, None),
        (S.RUNNING, None),
        (S.RUNNING, 0.5),
        (S.COMPLETED, 1.0),
    ]


# --- retention -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "ttl_field"),
    [(S.COMPLETED, "completed_ttl"), (S.FAILED, "failed_ttl"), (S.CANCELLED, "cancelled_ttl")],
)
async def test_ttl_per_status_counts_from_finished_at(
    clock: FakeClock, status: S, ttl_field: str
) -> None:
    ttls = {"completed_ttl": 100.0, "failed_ttl": 200.0, "cancelled_ttl": 300.0}
    async with taskd.Tracker(clock=clock, retention=taskd.Retention(**ttls)) as t:  # type: ignore[arg-type]
        rec = await t.create("x")
        active = await t.create("x")
        clock.advance(1000)  # time before finishing does not count
        if status is S.CANCELLED:
            await t.cancel(rec.task_id)
        else:
            await t.start(rec.task_id)
            await (t.complete(rec.task_id) if status is S.COMPLETED else t.fail(rec.task_id, "e"))
        clock.advance(ttls[ttl_field] - 1)
        assert await t.get(rec.task_id) is not None
        clock.advance(2)
        assert await t.get(rec.task_id) is None
        clock.advance(10**7)
        assert await t.get(active.task_id) is not None  # active never expires


async def test_ttl_fires_on_its_own_without_traffic() -> None:
    retention = taskd.Retention(completed_ttl=0.05)
    store = RecordingStore()
    async with taskd.Tracker(retention=retention, store=store) as t:
        rec = await t.create("x")
        await t.start(rec.task_id)
        await t.complete(rec.task_id)
        # Watched at the store, not asked of the actor: any command would fire a due
        # timer itself, and this is about the timer firing with no command at all.
        await eventually(lambda: rec.task_id in store.deleted, timeout=5)
        stats = await t.stats()
        assert stats["records"] == 0


async def test_cap_evicts_oldest_terminal_never_active(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock, retention=taskd.Retention(max_tasks=5)) as t:
        active = [(await t.create("x")).task_id for _ in range(2)]
        done = []
        for _ in range(3):
            r = await t.create("x")
            await t.cancel(r.task_id)
            done.append(r.task_id)
        newer = await t.create("x")  # 6th: evicts the oldest terminal
        assert await t.get(done[0]) is None
        assert all([await t.get(i) is not None for i in active + done[1:]])
        await t.cancel(newer.task_id)
        for _ in range(3):
            await t.create("x")
        assert all([await t.get(i) is not None for i in active])
        with pytest.raises(taskd.TrackerFull):
            await t.create("x")  # five active, nothing to evict
        assert len(await t.list(limit=200)) == 5


async def test_spawn_when_full_closes_the_coroutine(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock, retention=taskd.Retention(max_tasks=1)) as t:
        await t.create("x")

        async def work() -> None: ...

        with pytest.raises(taskd.TrackerFull):
            await t.spawn(work(), task_type="x")  # would warn "never awaited" otherwise


async def test_heartbeat_timeout_fails_silent_worker(clock: FakeClock) -> None:
    async with taskd.Tracker(clock=clock) as t:
        rec = await t.create("x", heartbeat_timeout=10)
        clock.advance(8)
        await t.start(rec.task_id)  # a report: the deadline moves
        clock.advance(8)
        await t.progress(rec.task_id, 0.1)
        clock.advance(9)
        got = await t.get(rec.task_id)
        assert got is not None and got.status is S.RUNNING
        clock.advance(2)
        await t.get(rec.task_id)  # this batch fires the timer
        got = await t.get(rec.task_id)
        assert got is not None and got.status is S.FAILED
        assert got.error == "heartbeat timeout"


# --- robustness ------------------------------------------------------------------


class EndHookWithABug(Subscription):
    """A subscription with a bug in its own code (an ``end`` hook that raises), which
    the actor runs inside its ``Subscribe`` handler: a handler bug, provoked through
    the public ``Tracker.subscribe``."""

    __slots__ = ()

    def end(self) -> None:
        super().end()
        raise RuntimeError("end hook bug")


async def test_failed_command_answers_its_caller_and_loop_goes_on(
    tracker: taskd.Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(taskd.TaskNotFound):
        await tracker.start("missing")
    # An unexpected error in one handler: that caller gets it, it is logged (a bug,
    # not a refusal), and the others go on.
    done = await tracker.create("x")
    await tracker.start(done.task_id)
    await tracker.complete(done.task_id, None)  # a finished task: subscribing ends it
    with pytest.raises(RuntimeError, match="end hook bug"):
        await asyncio.wait_for(tracker.subscribe(EndHookWithABug(task_id=done.task_id)), 5)
    assert "handler for Subscribe raised" in caplog.text
    assert tracker.state is taskd.TrackerState.OPEN
    rec = await tracker.create("x")
    assert (await tracker.get(rec.task_id)) == rec
    assert tracker.subscriber_count == 0


def cancel_the_tasks_i_did_not_start(mine: Collection[asyncio.Future[taskd.TaskRecord]]) -> None:
    """What a program's shutdown does when it cancels every task but its own before
    closing the tracker (``asyncio.run`` at exit, a signal handler): here the only
    task that is not this test's is the tracker's actor."""
    others = asyncio.all_tasks() - {asyncio.current_task()} - set(mine)
    assert [t.get_name() for t in others] == ["taskd-actor"]
    for task in others:
        task.cancel()


async def test_killed_actor_fails_every_caller_fast() -> None:
    t = taskd.Tracker()
    await t.__aenter__()
    rec = await t.create("x")
    pending = [asyncio.ensure_future(t.wait(rec.task_id)) for _ in range(10)]

    async def parked() -> bool:
        return (await t.stats())["waiters"] == 10

    await eventually(parked)
    cancel_the_tasks_i_did_not_start(pending)
    started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 1.0)
    assert all(isinstance(r, taskd.TrackerClosed) for r in results), results
    with pytest.raises(taskd.TrackerClosed):
        await asyncio.wait_for(t.get(rec.task_id), 1.0)
    assert time.monotonic() - started < 1.0
    assert t.state is taskd.TrackerState.CLOSED
    await t.aclose()


async def test_actor_cancelled_before_its_first_step_fails_callers() -> None:
    """A shutdown that cancels every task right after the tracker opened: the actor
    never ran, so its own clean-up never ran either; callers still get
    ``TrackerClosed`` at once and ``aclose`` returns (docs/architecture.md)."""
    t = taskd.Tracker()
    await t.__aenter__()
    cancel_the_tasks_i_did_not_start(())
    with pytest.raises(taskd.TrackerClosed):
        await asyncio.wait_for(t.get("x"), 1.0)
    await asyncio.wait_for(t.aclose(), 5.0)
    assert t.state is taskd.TrackerState.CLOSED


async def test_a_loop_that_dies_between_batches_fails_the_batch_it_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The actor's loop dies after taking a batch off the mailbox but before handing
    it out (here: its clock raises): that batch's callers get ``TrackerClosed`` too,
    none waits for ever."""
    clock = FakeClock()
    broken = False

    def now() -> float:
        if broken:
            raise RuntimeError("clock failure")
        return clock()

    t = taskd.Tracker(clock=now)
    await t.__aenter__()
    rec = await t.create("x")
    broken = True
    results = await asyncio.wait_for(
        asyncio.gather(*(t.start(rec.task_id) for _ in range(5)), return_exceptions=True),
        2.0,
    )
    assert all(isinstance(r, taskd.TrackerClosed) for r in results), results
    await t.aclose()
    assert "the actor had died" in caplog.text  # its death is logged, not hidden


async def test_calls_before_open_and_after_close_raise_tracker_closed() -> None:
    t = taskd.Tracker()
    with pytest.raises(taskd.TrackerClosed):
        await t.get("x")
    async with t:
        pass
    with pytest.raises(taskd.TrackerClosed):
        await t.create("x")
    await t.aclose()  # idempotent
    assert "closed" in repr(t)


async def test_shutdown_waits_then_cancels_running_tasks() -> None:
    finished_in_time = asyncio.Event()

    async def quick() -> str:
        await asyncio.sleep(0.05)
        finished_in_time.set()
        return "done"

    async with taskd.Tracker(close_timeout=0.3) as t:
        fast = await t.spawn(quick(), task_type="x")
        slow = await t.spawn(asyncio.sleep(60), task_type="x")
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert finished_in_time.is_set()
    assert fast.done() and await fast == "done"
    assert slow.done()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert 0.25 < elapsed < 2.0


async def test_shutdown_records_cancelled_state(clock: FakeClock) -> None:
    store = RecordingStore()
    running = asyncio.Event()

    async def work() -> None:
        running.set()
        await asyncio.sleep(60)

    async with taskd.Tracker(store=store, close_timeout=0.05) as t:
        h = await t.spawn(work(), task_type="x")
        await running.wait()
    final = store.seen[h.task_id]
    assert final.status is S.CANCELLED
    assert final.error == "cancelled: tracker shutting down"


async def test_coroutine_ignoring_cancellation_does_not_hang_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    started = time.monotonic()
    async with taskd.Tracker(close_timeout=0.1) as t:
        h = await t.spawn(stubborn(), task_type="x")
        await running.wait()  # inside its loop: the cancel at shutdown is ignored
    assert time.monotonic() - started < 0.1 + 1.0 + 0.5
    assert "ignored cancellation" in caplog.text
    assert h.done()
    release.set()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task() and "stubborn" in repr(task.get_coro()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"task_type": ""}, ValueError),
        ({"task_type": "x" * 129}, ValueError),
        ({"task_type": "has space"}, ValueError),
        ({"task_type": "slash/no"}, ValueError),
        ({"task_type": 5}, TypeError),
        ({"task_type": "x", "resource_id": ""}, ValueError),
        ({"task_type": "x", "resource_id": 7}, TypeError),
        ({"task_type": "x", "resource_id": "a\nb"}, ValueError),
        ({"task_type": "x", "metadata": [1]}, TypeError),
        ({"task_type": "x", "metadata": {"k": object()}}, TypeError),
        ({"task_type": "x", "metadata": {"k": float("nan")}}, ValueError),
        ({"task_type": "x", "metadata": {"k": "v" * 17000}}, ValueError),
        ({"task_type": "x", "metadata": {1: "v"}}, TypeError),
        ({"task_type": "x", "heartbeat_timeout": 0}, ValueError),
        ({"task_type": "x", "heartbeat_timeout": "5"}, TypeError),
        ({"task_type": "x", "callback_url": "ftp://x"}, ValueError),
    ],
)
async def test_create_rejects_bad_input(tracker: taskd.Tracker, kwargs: dict, error: type) -> None:  # type: ignore[type-arg]
    task_type = kwargs.pop("task_type")
    with pytest.raises(error):
        await tracker.create(task_type, **kwargs)
    assert await tracker.list() == []


@pytest.mark.parametrize("limit", [0, -1, 201])
async def test_list_limit_out_of_range(tracker: taskd.Tracker, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        await tracker.list(limit=limit)


async def test_list_rejects_unknown_status_and_bad_types(tracker: taskd.Tracker) -> None:
    with pytest.raises(ValueError, match="unknown status"):
        await tracker.list(status="done")
    with pytest.raises(ValueError, match="unknown status"):
        await tracker.list(status=["failed", "nope"])
    with pytest.raises(TypeError):
        await tracker.list(limit="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await tracker.list(limit=True)


async def test_non_json_result_and_bad_progress_leave_state_unchanged(
    tracker: taskd.Tracker,
) -> None:
    rec = await tracker.start((await tracker.create("x")).task_id)
    with pytest.raises(TypeError):
        await tracker.complete(rec.task_id, {"x": {1, 2}})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        await tracker.complete(rec.task_id, float("inf"))
    with pytest.raises(ValueError):
        await tracker.progress(rec.task_id, 2)
    with pytest.raises(TypeError):
        await tracker.fail(rec.task_id, 42)  # type: ignore[arg-type]
    assert await tracker.get(rec.task_id) == rec


async def test_spawn_rejects_non_coroutines(tracker: taskd.Tracker) -> None:
    async def work() -> None: ...

    with pytest.raises(TypeError):
        await tracker.spawn(work, task_type="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await tracker.spawn(work(), task_type="bad type")
    with pytest.raises(ValueError):
        await tracker.spawn(work(), task_type="x", timeout=-1)


def test_tracker_options_checked_at_construction() -> None:
    with pytest.raises(TypeError):
        taskd.Tracker(retention={"max_tasks": 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        taskd.Tracker(close_timeout=-1)
    with pytest.raises(TypeError):
        taskd.Tracker(store=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        taskd.Retention(max_tasks=0)
    with pytest.raises(ValueError):
        taskd.Retention(completed_ttl=0)
    with pytest.raises(TypeError):
        taskd.Retention(failed_ttl="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        taskd.Tracker(5)  # type: ignore[call-arg, arg-type]


async def test_results_are_copied_on_the_way_in(tracker: taskd.Tracker) -> None:
    payload = {"items": [1, 2]}
    rec = await tracker.start((await tracker.create("x", metadata={"m": [1]})).task_id)
    done = await tracker.complete(rec.task_id, payload)
    payload["items"].append(3)
    assert done.result == {"items": [1, 2]}
    assert (await tracker.get(rec.task_id)) is done  # same object: no copy on read


async def test_fast_spawn_is_visible_at_once_and_admitted_against_the_cap() -> None:
    """A spawn without resource_id (in memory, no quota) returns without a round trip
    to the actor; the task is still visible to the caller's next command, ids keep
    creation order with created tasks, and the cap still refuses (docs/architecture.md)."""

    async def sleeper() -> str:
        await asyncio.sleep(30)
        return "late"

    retention = taskd.Retention(max_tasks=3)
    async with taskd.Tracker(retention=retention, close_timeout=0) as t:
        first = await t.create("ext")
        handles = [await t.spawn(sleeper(), task_type="bg") for _ in range(2)]
        # The caller built these records, before the actor had its turn.
        assert [h.record.status for h in handles] == [S.RUNNING, S.RUNNING]
        got = await t.get(handles[1].task_id)
        assert got is not None and got.status is S.RUNNING and got.in_process
        page = await t.list_page(limit=10)
        assert [r.task_id for r in page.records] == [
            handles[1].task_id,
            handles[0].task_id,
            first.task_id,
        ]
        # Three active tasks fill the cap: the next spawn is refused, not handed out.
        coro = sleeper()
        with pytest.raises(taskd.TrackerFull):
            await t.spawn(coro, task_type="bg")
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # never ran
        await t.cancel(handles[0].task_id)
        with pytest.raises(asyncio.CancelledError):
            await handles[0]


async def test_fast_spawns_queued_when_the_actor_dies_fail_their_handles() -> None:
    t = taskd.Tracker()
    await t.__aenter__()
    ran: list[int] = []

    async def work() -> int:
        ran.append(1)
        return 1

    await t.stats()  # the actor is up, waiting on its mailbox
    # Fast-path spawns: the handles are out, the spawns still queued for the actor.
    handles = [await t.spawn(work(), task_type="x") for _ in range(3)]
    assert len(t) == 0  # not one is booked yet: all three are still in the mailbox
    cancel_the_tasks_i_did_not_start(())
    for handle in handles:
        with pytest.raises(taskd.TrackerClosed):
            await asyncio.wait_for(handle, 1.0)
    assert ran == []  # their coroutines never ran
    assert t.state is taskd.TrackerState.CLOSED
    await t.aclose()  # closing a tracker whose actor died does not hang


# --- the read fast path (docs/architecture.md) ------------------------------------


async def test_get_never_answers_a_record_past_its_ttl(clock: FakeClock) -> None:
    """A get with nothing queued for the actor reads the state directly; once a
    deadline has passed it leaves the answer to the actor, which expires first."""
    async with taskd.Tracker(clock=clock, retention=taskd.Retention(completed_ttl=5)) as t:
        rec = await t.create("x")
        await t.start(rec.task_id)
        await t.complete(rec.task_id, None)
        assert (await t.get(rec.task_id)) is not None
        clock.advance(5.5)
        assert (await t.get(rec.task_id)) is None
        assert (await t.stats())["records"] == 0


async def test_get_sees_every_command_sent_before_it(tracker: taskd.Tracker) -> None:
    """Fire-and-forget messages still queued (a fast-path spawn, a runner's end)
    send the get through the actor, behind them."""

    async def work() -> int:
        return 7

    handle = await tracker.spawn(work(), task_type="x")
    got = await tracker.get(handle.task_id)  # the Spawn message is still queued
    assert got is not None and got.task_id == handle.task_id
    assert await handle == 7
    got = await tracker.get(handle.task_id)
    assert got is not None and got.status is S.COMPLETED


async def test_a_loop_of_gets_lets_other_tasks_run(tracker: taskd.Tracker) -> None:
    """get is a suspension point even when it reads directly: a caller polling in a
    tight loop does not starve the task it waits for."""
    rec = await tracker.create("x")
    await tracker.start(rec.task_id)

    async def worker() -> None:
        for _ in range(3):  # a few steps of its own before it reports
            await asyncio.sleep(0)
        await tracker.complete(rec.task_id, None)

    job = asyncio.get_running_loop().create_task(worker())
    polls = 0
    while polls < 10_000:  # a starved worker would never get there
        polls += 1
        got = await tracker.get(rec.task_id)
        if got is not None and got.status is S.COMPLETED:
            break
    else:
        raise AssertionError("the worker never ran while the caller polled")
    assert polls > 1
    await job


async def test_handles_are_future_like_for_gather_and_wait(tracker: taskd.Tracker) -> None:
    """docs/embedding.md: ``asyncio.gather(*handles)`` takes handles as futures (no
    task per handle), returns their values, raises or returns their exceptions, and,
    cancelled, cancels the tracked tasks; ``asyncio.wait`` takes them too."""

    async def value(i: int) -> int:
        return i

    async def boom() -> None:
        raise ValueError("no")

    handles = [await tracker.spawn(value(i), task_type="x") for i in range(5)]
    assert all(asyncio.isfuture(h) for h in handles)
    wrapped: object = asyncio.ensure_future(handles[0])
    assert wrapped is handles[0]  # used as it is: no task made for it
    assert await asyncio.gather(*handles) == [0, 1, 2, 3, 4]
    assert handles[2].result() == 2 and handles[2].exception() is None
    failing = await tracker.spawn(boom(), task_type="x")
    (err,) = await asyncio.gather(failing, return_exceptions=True)
    assert isinstance(err, ValueError) and failing.exception() is err
    with pytest.raises(ValueError):
        failing.result()

    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    blocked = await tracker.spawn(stuck(), task_type="x")
    with pytest.raises(asyncio.InvalidStateError):
        blocked.result()
    gathered = asyncio.gather(blocked)
    await started.wait()
    gathered.cancel()  # cancels its children: the tracked task
    with pytest.raises(asyncio.CancelledError):
        await gathered
    rec = await tracker.wait(blocked.task_id, timeout=5)
    assert rec.status is S.CANCELLED and blocked.cancelled()

    # (typeshed types wait() for Future subclasses only; a handle is future-like)
    done, pending = await asyncio.wait([await tracker.spawn(value(7), task_type="x")])  # type: ignore[type-var]
    assert not pending and [h.result() for h in done] == [7]

    called: list[object] = []
    seen = asyncio.Event()
    late = await tracker.spawn(value(8), task_type="x")

    def note(handle: object) -> None:
        called.append(handle)
        seen.set()

    late.add_done_callback(note)
    late.add_done_callback(print)
    assert late.remove_done_callback(print) == 1
    await late
    await seen.wait()  # (done callbacks run soon after, as a future's do)
    assert called == [late]


async def test_an_object_result_is_held_as_compact_text_and_reads_back_equal() -> None:
    """An object or array result is kept as its compact JSON text, decoded when read
    (docs/benchmarks.md: a quarter of a small dict's size); the caller's value is not
    shared with the record."""
    async with taskd.Tracker() as tracker:
        rec = await tracker.create("report")
        await tracker.start(rec.task_id)
        value: dict[str, taskd.JSON] = {"status": "ok", "rows": [1, 2], "name": "é"}
        done = await tracker.complete(rec.task_id, value)
        value["rows"] = None
        assert isinstance(done.result_data, bytes)
        assert sys.getsizeof(done.result_data) < sys.getsizeof(value) / 2
        assert done.result == {"status": "ok", "rows": [1, 2], "name": "é"}
        assert json.loads(done.to_json())["result"] == done.result
        scalar = await tracker.create("count")
        await tracker.start(scalar.task_id)
        assert (await tracker.complete(scalar.task_id, 7)).result_data == 7  # a scalar as is
