"""``report_progress`` from threads a spawned task started (docs/embedding.md,
"From synchronous code"): through ``asyncio.to_thread``, ``run_in_executor`` and a
real thread pool, every update reaches the record, and none touches the event loop
from another thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

import taskd
from taskd import report_progress
from taskd.testing import eventually


async def _progress_of(tracker: taskd.Tracker, task_id: str) -> tuple[float | None, str | None]:
    rec = await tracker.get(task_id)
    assert rec is not None
    return rec.progress, rec.message


async def test_progress_from_to_thread_and_run_in_executor(tracker: taskd.Tracker) -> None:
    seen: list[str] = []
    go = asyncio.Event()

    def blocking(fraction: float, text: str) -> str:
        seen.append(threading.current_thread().name)
        report_progress(fraction, text)
        return text

    async def work() -> str:
        await asyncio.to_thread(blocking, 0.25, "to_thread")
        await go.wait()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, blocking, 0.75, "executor")

    handle = await tracker.spawn(work(), task_type="sync")

    async def quarter() -> bool:
        return await _progress_of(tracker, handle.task_id) == (0.25, "to_thread")

    await eventually(quarter)
    go.set()
    assert await handle == "executor"
    assert all(name != threading.main_thread().name for name in seen)
    # (the last update before the end is kept until the task completes)
    rec = await tracker.get(handle.task_id)
    assert rec is not None and rec.status is taskd.TaskStatus.COMPLETED


async def test_a_thread_pool_of_reporters(tracker: taskd.Tracker) -> None:
    """Eight threads report 50 times each while the loop keeps serving: every call
    returns, and the record's last message is one of theirs. In asyncio's debug mode,
    a call that touched the loop from another thread would raise in that thread."""
    asyncio.get_running_loop().set_debug(True)
    done = asyncio.Event()

    def reporter(n: int) -> int:
        for i in range(50):
            report_progress((i + 1) / 50, f"worker {n} step {i + 1}")
        return n

    async def work() -> list[int]:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            # (an executor of the task's own: its context is passed along by hand)
            import contextvars

            jobs = [
                loop.run_in_executor(pool, contextvars.copy_context().run, reporter, n)
                for n in range(8)
            ]
            got = await asyncio.gather(*jobs)
        await done.wait()
        return got

    handle = await tracker.spawn(work(), task_type="pool")

    async def finished_reports() -> bool:
        progress, message = await _progress_of(tracker, handle.task_id)
        return progress == 1.0 and message is not None and message.endswith("step 50")

    await eventually(finished_reports)
    done.set()
    assert sorted(await handle) == list(range(8))


async def test_an_applications_default_executor_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    mine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="app-pool")
    loop.set_default_executor(mine)
    async with taskd.Tracker() as t:
        name = await loop.run_in_executor(None, lambda: threading.current_thread().name)
        assert name.startswith("app-pool")
        # outside a spawned task, in a thread: the same clear error as anywhere
        with pytest.raises(RuntimeError, match="inside a task started by spawn"):
            await loop.run_in_executor(None, report_progress, 0.5)
        assert len(t) == 0
