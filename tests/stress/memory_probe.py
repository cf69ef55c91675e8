"""Run as a script: push N tasks through a tracker capped at CAP, with some tasks kept
active all along; print peak RSS and whether every active task survived (JSON)."""

from __future__ import annotations

import asyncio
import json
import resource
import sys

import taskd


async def main(total: int, cap: int, workers: int = 50) -> None:
    keep_active = 100
    async with taskd.Tracker(retention=taskd.Retention(max_tasks=cap)) as t:
        active = [
            (await t.create("long", resource_id=f"keep-{i}")).task_id for i in range(keep_active)
        ]
        per = (total - keep_active) // workers

        async def worker(w: int) -> None:
            for i in range(per):
                rec = await t.create("short", resource_id=f"w{w}-{i}", metadata={"i": i})
                await t.start(rec.task_id)
                if i % 3:
                    await t.complete(rec.task_id, {"w": w, "i": i})
                else:
                    await t.fail(rec.task_id, "password=hunter2 failed")

        await asyncio.gather(*(worker(w) for w in range(workers)))
        survived = all([(await t.get(tid)) is not None for tid in active])
        stats = await t.stats()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "tasks": keep_active + per * workers,
                "records_at_end": stats["records"],
                "active_survived": survived,
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
