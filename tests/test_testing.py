"""``taskd.testing`` (docs/embedding.md, "Testing your code"): FakeClock and eventually,
and the two examples that section shows."""

from __future__ import annotations

import asyncio
import time

import pytest

import taskd
from taskd.testing import FakeClock, eventually

# --- FakeClock -------------------------------------------------------------------


def test_fake_clock_reads_and_moves_by_hand() -> None:
    clock = FakeClock()
    assert clock() == clock.now == 1_800_000_000.0
    clock.advance(61)
    assert clock() == 1_800_000_061.0
    clock.advance(-1)  # a wall clock stepped back
    assert clock() == 1_800_000_060.0
    assert FakeClock(5.0)() == 5.0
    assert repr(FakeClock(5.0)) == "FakeClock(now=5.0)"


async def test_fake_clock_drives_a_trackers_ttl() -> None:
    """The first example of docs/embedding.md, "Testing your code"."""
    clock = FakeClock()
    retention = taskd.Retention(completed_ttl=60)
    async with taskd.Tracker(clock=clock, retention=retention) as tracker:
        rec = await tracker.create("report")
        assert rec.created_at == clock.now
        await tracker.start(rec.task_id)
        await tracker.complete(rec.task_id, {"rows": 3})
        clock.advance(59)
        assert await tracker.get(rec.task_id) is not None
        clock.advance(2)
        assert await tracker.get(rec.task_id) is None


# --- eventually ------------------------------------------------------------------


async def test_eventually_returns_at_once_when_already_true() -> None:
    calls = 0

    def ready() -> bool:
        nonlocal calls
        calls += 1
        return True

    await eventually(ready, timeout=0)
    assert calls == 1


async def test_eventually_waits_for_a_change_another_task_makes() -> None:
    seen: list[int] = []

    async def producer() -> None:
        for i in range(3):
            await asyncio.sleep(0)  # a few steps of its own, then the change
            seen.append(i)

    task = asyncio.ensure_future(producer())
    await eventually(lambda: len(seen) == 3)
    await task


async def test_eventually_takes_an_async_predicate() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)

    async def is_set() -> bool:
        await asyncio.sleep(0)
        return event.is_set()

    await eventually(is_set)


async def test_eventually_fails_with_the_predicates_name_after_the_timeout() -> None:
    def never() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"never still false after 0\.05 s \(\d+ checks\)"):
        await eventually(never, timeout=0.05, interval=0.01)
    assert time.monotonic() - started < 5  # bounded by the timeout, with slack for a busy CI


async def test_an_assertion_in_the_predicate_means_not_yet_and_is_the_cause() -> None:
    attempts = 0

    def settles() -> bool:
        nonlocal attempts
        attempts += 1
        assert attempts >= 3, f"only {attempts}"
        return True

    await eventually(settles)
    assert attempts == 3

    def refuses() -> bool:
        raise AssertionError("status is pending")

    with pytest.raises(AssertionError, match="status is pending") as info:
        await eventually(refuses, timeout=0.03)
    assert isinstance(info.value.__cause__, AssertionError)


async def test_other_exceptions_propagate_at_once() -> None:
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise KeyError("oops")

    with pytest.raises(KeyError):
        await eventually(broken, timeout=30)
    assert calls == 1

    async def times_out_itself() -> bool:
        raise TimeoutError("its own")

    with pytest.raises(TimeoutError, match="its own"):
        await eventually(times_out_itself, timeout=30)


async def test_a_hanging_async_predicate_is_cancelled_at_the_timeout() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    with pytest.raises(AssertionError, match="hangs still false"):
        await eventually(hangs, timeout=0.05)
    assert cancelled.is_set()


async def test_eventually_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        await eventually(lambda: True, timeout=-1)
    with pytest.raises(ValueError):
        await eventually(lambda: True, interval=0)


async def test_eventually_orders_a_cancel_after_a_parked_wait() -> None:
    """The second example of docs/embedding.md, "Testing your code"."""
    async with taskd.Tracker() as tracker:
        rec = await tracker.create("report")
        waiter = asyncio.ensure_future(tracker.wait(rec.task_id))

        async def parked() -> bool:
            return (await tracker.stats())["waiters"] == 1

        await eventually(parked)
        await tracker.cancel(rec.task_id)
        assert (await waiter).status is taskd.TaskStatus.CANCELLED
