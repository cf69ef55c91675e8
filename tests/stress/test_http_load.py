"""50 concurrent HTTP clients for 20 seconds against a real server: mixed creates,
updates, gets, lists, cancels and long-polls. Zero 5xx; at the end every task's state
agrees with what its client was acknowledged. Prints /health latency percentiles."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..service import Service

API = "/api/v1"
CLIENTS = 50
DURATION = 20.0


async def test_http_load_with_invariants(tmp_path: Path) -> None:
    s = await asyncio.to_thread(Service(tmp_path).start)
    acked: dict[str, dict[str, Any]] = {}
    statuses: list[int] = []
    health_ms: list[float] = []
    deadline = time.monotonic() + DURATION

    async def client(n: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(n)
        mine: list[str] = []
        while time.monotonic() < deadline:
            op = rng.random()
            if op < 0.25 or not mine:
                async with http.post(
                    f"{s.url}{API}/tasks",
                    json={"task_type": f"load{n % 5}", "resource_id": f"c{n}-{rng.randint(0, 3)}"},
                ) as r:
                    statuses.append(r.status)
                    body = await r.json()
                    if r.status == 201:
                        acked[body["result"]["task_id"]] = body["result"]
                        mine.append(body["result"]["task_id"])
                continue
            tid = rng.choice(mine)
            if op < 0.55:
                step = rng.choice(["start", "progress", "complete", "fail", "cancel"])
                payload: Any = {
                    "progress": {"progress": rng.random(), "message": "step"},
                    "complete": {"result": {"n": n}},
                    "fail": {"error": "token=secret-value broke"},
                }.get(step)
                async with http.post(f"{s.url}{API}/tasks/{tid}/{step}", json=payload) as r:
                    statuses.append(r.status)
                    body = await r.json()
                    if r.status in (200, 202):
                        acked[tid] = body["result"]
                    else:
                        assert r.status == 409, body  # a transition the state forbids
            elif op < 0.75:
                async with http.get(f"{s.url}{API}/tasks/{tid}") as r:
                    statuses.append(r.status)
                    await r.read()
            elif op < 0.85:
                async with http.get(f"{s.url}{API}/tasks/{tid}?wait=0.2") as r:
                    statuses.append(r.status)
                    await r.read()
            else:
                async with http.get(
                    f"{s.url}{API}/tasks", params={"status": "running,failed", "limit": "20"}
                ) as r:
                    statuses.append(r.status)
                    await r.read()

    async def prober(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            async with http.get(f"{s.url}/health") as r:
                await r.read()
                statuses.append(r.status)
            health_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.05)

    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(prober(http), *(client(n, http) for n in range(CLIENTS)))
            assert not [c for c in statuses if c >= 500]
            assert len(statuses) > 2000
            # every task is exactly as its last acknowledged change left it
            for tid, rec in acked.items():
                async with http.get(f"{s.url}{API}/tasks/{tid}") as r:
                    assert r.status == 200
                    now = (await r.json())["result"]
                assert now == rec, (rec, now)
                if now["error"]:
                    assert "secret-value" not in now["error"]
    finally:
        assert await asyncio.to_thread(s.stop) == 0
    health_ms.sort()
    print(
        f"\n{len(statuses)} requests, {len(acked)} tasks, 0 5xx; /health p50 "
        f"{statistics.median(health_ms):.1f} ms p99 "
        f"{health_ms[int(len(health_ms) * 0.99) - 1]:.1f} ms"
    )
