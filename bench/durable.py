"""bench/durable.py: spawn-and-complete throughput, SQLite store vs the memory store.

Run: python bench/durable.py   (prints both rates, the ratio, and the fsync setting)

100 concurrent callers each spawn a trivial coroutine and await its outcome, so the
figure includes one commit for the spawn and one for the completion of every task,
batched by the actor's group commit. Runs are alternated, best of REPEATS.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import taskd

REPEATS = 5
CALLERS = 100
PER_CALLER = 50


async def noop() -> int:
    return 1


async def rate(store: taskd.Store | None) -> float:
    retention = taskd.Retention(max_tasks=1_000_000)
    async with taskd.Tracker(store=store, retention=retention) as tracker:

        async def caller() -> None:
            for _ in range(PER_CALLER):
                await (await tracker.spawn(noop(), task_type="bench"))

        gc.collect()
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return CALLERS * PER_CALLER / (time.perf_counter() - t0)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for sync in ("FULL", "NORMAL"):
            mem: list[float] = []
            disk: list[float] = []
            for i in range(REPEATS):
                mem.append(await rate(None))
                path = Path(tmp) / f"bench-{sync}-{i}.db"
                disk.append(await rate(taskd.SQLiteStore(path, synchronous=sync)))
            m, d = max(mem), max(disk)
            print(
                f"spawn+complete, {CALLERS} callers: memory {m:>9,.0f}/s  "
                f"SQLite (WAL, synchronous={sync}) {d:>9,.0f}/s  ratio {d / m:.2f}x  (goal >= 0.5x)"
            )


if __name__ == "__main__":
    asyncio.run(main())
