"""Faults under load: SIGTERM ends cleanly with every record final and every
acknowledged change kept. (SIGKILL under load: tests/test_sqlite.py; hanging SSE and
webhook peers: tests/test_push.py; a coroutine ignoring cancellation:
tests/test_tracker.py.)"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from taskd.testing import eventually

from ..service import Service

API = "/api/v1"


async def test_sigterm_under_load_exits_cleanly_with_records_final(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    s = await asyncio.to_thread(Service(tmp_path, "--db", str(db), "--demo").start)
    acked: dict[str, dict[str, Any]] = {}
    stop = asyncio.Event()

    async def worker(http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with http.post(f"{s.url}{API}/tasks", json={"task_type": "ext"}) as r:
                    if r.status != 201:
                        continue
                    rec = (await r.json())["result"]
                    acked[rec["task_id"]] = rec
                async with http.post(f"{s.url}{API}/tasks/{rec['task_id']}/start") as r:
                    if r.status == 200:
                        acked[rec["task_id"]] = (await r.json())["result"]
            except (aiohttp.ClientError, TimeoutError):
                return

    async with aiohttp.ClientSession() as http:
        workers = [asyncio.ensure_future(worker(http, n)) for n in range(10)]
        await eventually(lambda: len(acked) >= 200, timeout=60)  # well under way
        started = time.monotonic()
        s.send(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, s.stop)
        elapsed = time.monotonic() - started
        stop.set()
        await asyncio.gather(*workers)
    assert code == 0
    assert elapsed < 5.0 + 1.0 + 3.0  # close_timeout + cancel grace + start-up slack
    assert "taskd: stopped" in s.log() and "Traceback" not in s.log()
    async with Service(tmp_path, "--db", str(db)) as again, aiohttp.ClientSession() as http:
        async with http.get(f"{again.url}{API}/tasks?status=running,pending&limit=200") as r:
            active = (await r.json())["result"]
        # external tasks keep their state; every in-process one was finished
        assert all(rec["task_type"] == "ext" for rec in active)
        for tid, rec in acked.items():
            async with http.get(f"{again.url}{API}/tasks/{tid}") as r:
                assert r.status == 200
                assert (await r.json())["result"] == rec
