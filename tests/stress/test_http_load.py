"""50 concurrent HTTP clients against a real server until they have made 10,000
requests: mixed creates, updates, gets, lists, cancels and long-polls. Zero 5xx; at the
end every task's state agrees with what its client was acknowledged. Prints the rate and
/health latency percentiles.

The run is bounded by its amount of work, not by a clock: a loaded machine makes it
slower, never different. Every client is awaited (a ``TaskGroup``: one failing cancels
and awaits the rest) before the session closes and before the server stops, and the
server is stopped however the test ends, its start included."""

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
REQUESTS = 20_000


async def test_http_load_with_invariants(tmp_path: Path) -> None:
    s = Service(tmp_path)
    acked: dict[str, dict[str, Any]] = {}
    statuses: list[int] = []
    health_ms: list[float] = []

    def more() -> bool:
        return len(statuses) < REQUESTS

    async def client(n: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(n)
        mine: list[str] = []
        while more():
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
        while more():
            t0 = time.perf_counter()
            async with http.get(f"{s.url}/health") as r:
                await r.read()
                statuses.append(r.status)
            health_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.05)

    try:
        await asyncio.to_thread(s.start)
        began = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async with asyncio.TaskGroup() as clients:
                clients.create_task(prober(http))
                for n in range(CLIENTS):
                    clients.create_task(client(n, http))
            elapsed = time.monotonic() - began
            assert not [c for c in statuses if c >= 500]
            assert len(statuses) >= REQUESTS
            # every task is exactly as its last acknowledged change left it
            for tid, rec in acked.items():
                async with http.get(f"{s.url}{API}/tasks/{tid}") as r:
                    assert r.status == 200
                    now = (await r.json())["result"]
                assert now == rec, (rec, now)
                if now["error"]:
                    assert "secret-value" not in now["error"]
    finally:
        if s.proc is not None:  # it started, or tried to: stop it, close its log
            assert await asyncio.to_thread(s.stop) == 0
    health_ms.sort()
    print(
        f"\n{len(statuses)} requests in {elapsed:.1f} s, {len(acked)} tasks, 0 5xx; /health p50 "
        f"{statistics.median(health_ms):.1f} ms p99 "
        f"{health_ms[int(len(health_ms) * 0.99) - 1]:.1f} ms"
    )
