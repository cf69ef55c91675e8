"""bench/push.py: 1,000 SSE subscribers on one task; latency from a state change to
each subscriber (and to the last one) receiving it.

Run: python bench/push.py [--subscribers 1000] [--changes 30]

The server is a real `taskd serve` subprocess; the subscribers are aiohttp streams in
this process (one event loop, like a fan-out proxy would be). Each change is a
`POST /progress`; its latency is measured from just before the POST is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(n_subs: int, n_changes: int) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, before measuring)
        [sys.executable, "-m", "taskd", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            async with http.post(f"{base}/tasks", json={"task_type": "bench"}) as resp:
                task_id = (await resp.json())["result"]["task_id"]
            async with http.post(f"{base}/tasks/{task_id}/start"):
                pass
            received: list[dict[int, float]] = [{} for _ in range(n_subs)]
            ready = asyncio.Semaphore(0)
            counts: dict[int, int] = {}
            all_in: dict[int, asyncio.Event] = {k: asyncio.Event() for k in range(1, n_changes + 1)}

            async def subscriber(i: int) -> None:
                async with http.get(f"{base}/tasks/{task_id}/events") as resp:
                    first = True
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            now = time.perf_counter()
                            rec = json.loads(line[6:])
                            if first:
                                first = False
                                ready.release()
                                continue
                            step = round((rec["progress"] or 0) * 1000)
                            received[i][step] = now
                            counts[step] = counts.get(step, 0) + 1
                            if counts[step] == n_subs and step in all_in:
                                all_in[step].set()

            subs = [asyncio.ensure_future(subscriber(i)) for i in range(n_subs)]
            for _ in range(n_subs):
                await asyncio.wait_for(ready.acquire(), 60)
            sent: dict[int, float] = {}
            for k in range(1, n_changes + 1):
                sent[k] = time.perf_counter()
                async with http.post(
                    f"{base}/tasks/{task_id}/progress", json={"progress": k / 1000}
                ) as resp:
                    assert resp.status == 200
                await asyncio.wait_for(all_in[k].wait(), 30)
                await asyncio.sleep(0.05)
            async with http.post(f"{base}/tasks/{task_id}/complete", json={"result": 1}):
                pass
            await asyncio.wait_for(asyncio.gather(*subs), 30)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    every = [(r[k] - sent[k]) * 1000 for r in received for k in sent]
    last = [(max(r[k] for r in received) - sent[k]) * 1000 for k in sent]
    print(f"{n_subs} SSE subscribers on one task, {n_changes} changes")
    print(
        f"  change -> each subscriber : p50 {statistics.median(every):7.1f} ms"
        f"   p99 {pct(every, 99):7.1f} ms"
    )
    print(
        f"  change -> last subscriber : p50 {statistics.median(last):7.1f} ms"
        f"   p99 {pct(last, 99):7.1f} ms   (goal p99 <= 250 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.subscribers, args.changes))
