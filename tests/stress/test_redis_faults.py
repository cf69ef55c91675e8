"""The Redis mode under attack and faults, from outside (docs/scale-out.md, "Faults and
hostile input"): real ``taskd serve --redis`` processes on real ``redis-server``s.
Items 4 and 8 of that round (the supervisor, file descriptors) are tested with the
server (tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_py

import taskd
from taskd.testing import eventually

from ..redis_server import RedisServer
from ..service import Service, cli, free_port

pytestmark = pytest.mark.stress

API = "/api/v1"
JSON_TYPE = {"Content-Type": "application/json"}


def _space() -> str:
    return f"rf-{uuid.uuid4().hex[:10]}:"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hostile_tokens(rng: random.Random, n: int) -> list[str]:
    """Tokens nobody signed: random bytes, random JSON, lone surrogates, wrong types."""
    out: list[str] = []
    shapes: list[object] = [
        {"c": "\ud800", "f": "fe44a8cccd89edae"},
        {"c": "\udfff\ud800", "m": "0" * 32},
        {"c": None, "m": None},
        {"c": ["x"], "m": {}},
        {"c": "z" * 300, "m": "1" * 32},
        [],
        "text",
        1e308,
    ]
    for i in range(n):
        kind = i % 3
        if kind == 0:
            raw = rng.randbytes(rng.randint(1, 200))
        elif kind == 1:
            raw = json.dumps(rng.choice(shapes)).encode()
        else:
            raw = json.dumps({"c": chr(rng.randint(0xD800, 0xDFFF)), "m": "a" * 32}).encode()
        out.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))
    return out


async def test_hostile_page_tokens_leave_every_worker_serving(tmp_path: Path) -> None:
    """Item 1: 300 forged tokens over 2 processes: all 400, both serve after, and both
    stop promptly on SIGTERM."""
    redis = RedisServer(tmp_path / "r").start()
    try:
        space = _space()
        services = [Service(tmp_path, "--redis", redis.url, "--redis-prefix", space)]
        services.append(Service(tmp_path, "--redis", redis.url, "--redis-prefix", space))
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in services))
        tokens = _hostile_tokens(random.Random(7), 300)
        async with aiohttp.ClientSession() as http:

            async def probe(i: int, token: str) -> int:
                url = f"{services[i % 2].url}{API}/tasks"
                async with http.get(url, params={"page_token": token}) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(probe(i, t) for i, t in enumerate(tokens)))
            assert set(statuses) == {400}
            for s in services:
                async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                    assert resp.status == 201
                async with http.get(f"{s.url}/health") as resp:
                    assert resp.status == 200
        started = time.monotonic()
        codes = await asyncio.gather(*(asyncio.to_thread(s.stop) for s in services))
        assert codes == [0, 0]
        assert time.monotonic() - started < 10
    finally:
        redis.stop()


async def test_large_results_do_not_grow_a_worker(tmp_path: Path) -> None:
    """Item 2: 150 × (complete with a ~1 MB result, GET, DELETE) leave a worker's RSS
    within ~2 caches' budgets of where it started (count-bounded, it grew by 1.1 GiB
    over 300)."""
    redis = RedisServer(tmp_path / "r").start()
    blob = "x" * 1_000_000  # the most a request body holds (1 MiB) leaves for it
    try:
        async with (
            Service(tmp_path, "--redis", redis.url) as s,
            aiohttp.ClientSession() as http,
        ):
            assert s.proc is not None
            for i in range(150):
                async with http.post(f"{s.url}{API}/tasks", json={"task_type": "b"}) as resp:
                    tid = (await resp.json())["result"]["task_id"]
                await http.post(f"{s.url}{API}/tasks/{tid}/start")
                body = io.BytesIO(json.dumps({"result": {"i": i, "blob": blob}}).encode())
                async with http.post(
                    f"{s.url}{API}/tasks/{tid}/complete", data=body, headers=JSON_TYPE
                ) as resp:
                    assert resp.status == 200
                async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                    assert resp.status == 200
                    await resp.read()
                async with http.delete(f"{s.url}{API}/tasks/{tid}") as resp:
                    assert resp.status == 204
                if i == 20:
                    base = _rss_mib(s.proc.pid)
            grown = _rss_mib(s.proc.pid) - base
            assert grown < 160, f"RSS grew {grown:.0f} MiB"
    finally:
        redis.stop()


async def test_an_evicting_redis_is_refused(tmp_path: Path) -> None:
    """Item 3: taskd serve on an allkeys-lru Redis exits 1 with one line."""
    redis = RedisServer(tmp_path / "r", "--maxmemory-policy", "allkeys-lru").start()
    try:
        out = await asyncio.to_thread(
            cli, "serve", "--redis", redis.url, "--port", str(free_port()), timeout=30
        )
        assert out.returncode == 1
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "maxmemory-policy" in out.stderr and "noeviction" in out.stderr
    finally:
        redis.stop()


async def test_a_read_only_redis_is_visible_and_recovers(tmp_path: Path) -> None:
    """Item 5, another refusal than a full Redis (tests/test_redis.py): a replica is
    read-only; writes 503, /health 503, and back when it is a primary again."""
    redis = RedisServer(tmp_path / "r").start()
    try:
        async with (
            Service(tmp_path, "--redis", redis.url) as s,
            aiohttp.ClientSession() as http,
        ):
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                tid = (await resp.json())["result"]["task_id"]
            # A primary that is not there: the data stays, writes are refused.
            redis.command("REPLICAOF", "127.0.0.1", str(free_port()))
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
            async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                assert resp.status == 200
            async with http.get(f"{s.url}/health") as resp:
                assert resp.status == 503 and "READONLY" in await resp.text()
            redis.command("REPLICAOF", "NO", "ONE")

            async def healthy() -> bool:
                async with http.get(f"{s.url}/health") as resp:
                    return resp.status == 200

            await eventually(healthy, 10, interval=0.1)
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 201
        assert s.log().count(" ERROR ") == 1, s.log()
    finally:
        redis.stop()


async def test_deleted_results_leave_redis(tmp_path: Path) -> None:
    """Item 6: 50 tasks complete with a secret-looking result and are deleted; no key
    of the deployment holds one afterwards, and the stream holds no result at all."""
    redis = RedisServer(tmp_path / "r").start()
    space = _space()
    try:
        async with (
            Service(tmp_path, "--redis", redis.url, "--redis-prefix", space) as s,
            aiohttp.ClientSession() as http,
        ):
            for i in range(50):
                async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                    tid = (await resp.json())["result"]["task_id"]
                await http.post(f"{s.url}{API}/tasks/{tid}/start")
                done = {"result": {"key": f"sk-SECRET-{i:04d}"}}
                await http.post(f"{s.url}{API}/tasks/{tid}/complete", json=done)
                async with http.delete(f"{s.url}{API}/tasks/{tid}") as resp:
                    assert resp.status == 204
        client = redis_py.Redis(port=redis.port)
        try:
            dumped = b"".join(
                client.dump(k) or b"" for k in client.scan_iter(match="{" + space + "}*")
            )
            assert b"sk-SECRET-" not in dumped
            stream = client.xrange("{" + space + "}x")
            assert stream and '"rz"' not in repr(stream)  # no entry carries a result
        finally:
            client.close()
    finally:
        redis.stop()


async def test_lists_matching_nothing_do_not_stall_other_workers(tmp_path: Path) -> None:
    """Item 7: four clients listing what matches nothing over 10,500 tasks on one
    process; another process's GET p50 stays low (it was 76-113 ms)."""
    redis = RedisServer(tmp_path / "r").start()
    space = _space()
    try:
        async with taskd.Tracker(
            redis=redis.url, redis_prefix=space, retention=taskd.Retention(max_tasks=20_000)
        ) as tracker:
            for _ in range(0, 10_500, 1_500):
                await asyncio.gather(*(tracker.create("x", owner="o") for _ in range(1_500)))
            probe = await tracker.create("x")
        a = Service(tmp_path, "--redis", redis.url, "--redis-prefix", space)
        b = Service(tmp_path, "--redis", redis.url, "--redis-prefix", space)
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        stop = asyncio.Event()
        walked: list[int] = []
        async with aiohttp.ClientSession() as http:

            async def lister() -> None:
                # No auth: tasks of no owner only; all but one have an owner.
                token: str | None = None
                while not stop.is_set():
                    params: dict[str, Any] = {"limit": "5", "task_type": "x"}
                    if token:
                        params["page_token"] = token
                    async with http.get(f"{a.url}{API}/tasks", params=params) as resp:
                        assert resp.status == 200
                        token = (await resp.json())["next_page_token"]
                    walked.append(1)

            listers = [asyncio.create_task(lister()) for _ in range(4)]
            times: list[float] = []
            try:
                for _ in range(200):
                    started = time.perf_counter()
                    async with http.get(f"{b.url}{API}/tasks/{probe.task_id}") as resp:
                        assert resp.status == 200
                    times.append(time.perf_counter() - started)
            finally:
                stop.set()
                await asyncio.gather(*listers)
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
        p50 = statistics.median(times) * 1000
        assert len(walked) > 20
        assert p50 < 25, f"GET p50 {p50:.1f} ms under non-matching lists"
    finally:
        redis.stop()
