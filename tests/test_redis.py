"""One task space for many processes (docs/scale-out.md): real ``taskd serve --redis``
processes, and workers embedding taskd (``tests/redis_worker.py``), on a real
``redis-server`` started by the test session."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import taskd

from .redis_server import RedisServer
from .service import Service, free_port

API = "/api/v1"


def prefix() -> str:
    return f"mp-{uuid.uuid4().hex[:10]}:"


async def start_all(services: list[Service]) -> list[Service]:
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in services))
    return services


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def trio(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Callable[..., Awaitable[list[Service]]]]:
    """Start N ``taskd serve --redis`` processes on one prefix (extra flags allowed)."""
    started: list[Service] = []

    async def make(n: int = 3, *flags: str, space: str | None = None) -> list[Service]:
        space = space or prefix()
        services = [
            Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", space, *flags)
            for _ in range(n)
        ]
        started.extend(services)
        return await start_all(services)

    yield make
    await asyncio.gather(*(asyncio.to_thread(s.__exit__, None, None, None) for s in started))


class Worker:
    """``tests/redis_worker.py``: taskd embedded in an aiohttp app, spawning in-process."""

    def __init__(self, tmp: Path, url: str, space: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"worker-{self.port}.log"
        self.argv = [sys.executable, "-m", "tests.redis_worker", str(self.port), url, space]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                import urllib.request

                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("worker did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def worker(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Callable[[str], Awaitable[Worker]]]:
    started: list[Worker] = []

    async def make(space: str) -> Worker:
        w = Worker(tmp_path, redis_server.url, space)
        started.append(w)
        return await asyncio.to_thread(w.start)

    yield make
    for w in started:
        w.stop()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, status: int | None = None, **kw: Any
) -> Any:
    async with http.request(method, url, **kw) as resp:
        body = None if resp.status == 204 else await resp.json()
        if status is not None:
            assert resp.status == status, body
        return body


async def record(http: aiohttp.ClientSession, base: str, tid: str) -> dict[str, Any]:
    body = await call(http, "GET", f"{base}{API}/tasks/{tid}", 200)
    result: dict[str, Any] = body["result"]
    return result


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> float:
    """Await until ``check()`` holds; returns how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - polling another process, bounded
            await asyncio.sleep(0.02)
    return time.monotonic() - started


# --- one task space -------------------------------------------------------------------


async def test_read_your_writes_across_processes(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b, c = await trio(3)
    created = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "job"})
    tid = created["result"]["task_id"]
    assert (await record(http, b.url, tid))["status"] == "pending"
    await call(http, "POST", f"{b.url}{API}/tasks/{tid}/start", 200)
    await call(http, "POST", f"{c.url}{API}/tasks/{tid}/progress", 200, json={"progress": 0.5})
    assert (await record(http, a.url, tid))["progress"] == 0.5
    await call(http, "POST", f"{a.url}{API}/tasks/{tid}/complete", 200, json={"result": [1]})
    for s in (a, b, c):
        rec = await record(http, s.url, tid)
        assert (rec["status"], rec["result"]) == ("completed", [1])
    await call(http, "DELETE", f"{c.url}{API}/tasks/{tid}", 204)
    for s in (a, b):
        await call(http, "GET", f"{s.url}{API}/tasks/{tid}", 404)


async def test_dedup_is_atomic_across_processes(trio: Any, http: aiohttp.ClientSession) -> None:
    services = await trio(3)
    body = {"task_type": "commit", "resource_id": "s1"}

    async def one(i: int) -> tuple[int, dict[str, Any]]:
        url = f"{services[i % 3].url}{API}/tasks"
        async with http.post(url, json=body) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(one(i) for i in range(60)))
    created = [b for s, b in answers if s == 201]
    conflicts = [b for s, b in answers if s == 409]
    assert len(created) == 1 and len(conflicts) == 59
    holder = created[0]["result"]["task_id"]
    assert all(c["error"]["code"] == "CONFLICT" for c in conflicts)
    assert all(c["error"]["details"]["task_id"] == holder for c in conflicts)


async def test_quota_is_global(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b = await trio(2, "--token", "alice=tok-a", "--max-active-per-owner", "2")
    auth = {"Authorization": "Bearer tok-a"}
    for s in (a, b):
        await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"}, headers=auth)
    body = await call(
        http, "POST", f"{a.url}{API}/tasks", 429, json={"task_type": "x"}, headers=auth
    )
    assert body["error"]["code"] == "RESOURCE_EXHAUSTED"


async def test_cap_and_ttl_are_global(redis_server: RedisServer) -> None:
    """Two trackers (two actors, two connections) on one prefix: the cap evicts the
    oldest finished task whichever process made it, and TTL expiry by either removes
    it for both."""
    space = prefix()
    clock_now = [1_800_000_000.0]
    retention = taskd.Retention(max_tasks=3, completed_ttl=10.0)
    opts: dict[str, Any] = {"redis": redis_server.url, "redis_prefix": space}
    async with (
        taskd.Tracker(retention=retention, clock=lambda: clock_now[0], **opts) as one,
        taskd.Tracker(retention=retention, clock=lambda: clock_now[0], **opts) as two,
    ):
        old = await one.create("x")
        await one.start(old.task_id)
        await two.complete(old.task_id)
        mid = await two.create("x")
        await two.create("x")
        newest = await one.create("x")  # full: the finished one is evicted
        assert await two.get(old.task_id) is None
        assert (await one.stats())["records"] == 3
        await one.start(mid.task_id)
        await one.complete(mid.task_id)
        clock_now[0] += 11
        await two.get(newest.task_id)  # any command of either sweeps what is due
        assert await one.get(mid.task_id) is None
        assert (await two.stats())["records"] == 2
        await two.create("x")
        with pytest.raises(taskd.TrackerFull):
            await one.create("x")  # three active tasks hold every slot


async def test_lists_and_page_tokens_are_global(trio: Any, http: aiohttp.ClientSession) -> None:
    a, b, c = await trio(3)
    made = []
    for i in range(10):
        s = (a, b)[i % 2]
        body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "t"})
        made.append(body["result"]["task_id"])
    seen: list[str] = []
    page = await call(http, "GET", f"{c.url}{API}/tasks?limit=3", 200)
    seen += [r["task_id"] for r in page["result"]]
    servers = [a, b, c]
    n = 0
    while page.get("next_page_token"):
        s = servers[n % 3]
        n += 1
        page = await call(
            http, "GET", f"{s.url}{API}/tasks?limit=3&page_token={page['next_page_token']}", 200
        )
        seen += [r["task_id"] for r in page["result"]]
    assert seen == made[::-1]


async def test_long_poll_on_one_process_sees_another(
    trio: Any, http: aiohttp.ClientSession
) -> None:
    """A long-poll parked on one process is answered when another process ends the
    task, not at its 30 s deadline (how soon: ``python bench/redis.py``)."""
    a, b = await trio(2)
    for _ in range(5):
        body = await call(http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "x"})
        tid = body["result"]["task_id"]
        poll = asyncio.ensure_future(call(http, "GET", f"{b.url}{API}/tasks/{tid}?wait=30", 200))

        async def parked(url: str = b.url) -> bool:
            async with http.get(f"{url}/metrics") as resp:
                return "taskd_waiters 1.0" in await resp.text()

        await until(parked)
        await call(http, "POST", f"{a.url}{API}/tasks/{tid}/cancel", 202)
        answer = await asyncio.wait_for(poll, 10)  # woken: far before the deadline
        assert answer["result"]["status"] == "cancelled"


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    event_id = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:") and event_id is not None:
            out.append((event_id, json.loads(line[5:])))
            event_id = None
            if len(out) == n:
                return out
    return out


async def test_event_streams_are_global_and_resumable(
    trio: Any, http: aiohttp.ClientSession
) -> None:
    a, b, c = await trio(3)

    async def subscribed(url: str) -> bool:
        async with http.get(f"{url}/metrics") as resp:
            return "taskd_subscriptions 1.0" in await resp.text()

    async with http.get(f"{a.url}{API}/events") as stream:
        await until(lambda: subscribed(a.url))
        ids = []
        for s in (b, c, b):
            body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "e"})
            ids.append(body["result"]["task_id"])
        events = await asyncio.wait_for(read_events(stream, 3), 5)
    assert [e[1]["task_id"] for e in events] == ids
    seqs = [e[0] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # Resume on another process from the first event: the two after it are replayed.
    headers = {"Last-Event-ID": str(seqs[0])}
    async with http.get(f"{c.url}{API}/events", headers=headers) as stream:
        replay = await asyncio.wait_for(read_events(stream, 2), 5)
    assert [e[0] for e in replay] == seqs[1:]


async def test_cancel_reaches_the_process_running_the_coroutine(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tid = (await call(http, "POST", f"{w.url}/spawn?seconds=60"))["task_id"]
    assert (await record(http, b.url, tid))["status"] == "running"
    body = await call(http, "POST", f"{b.url}{API}/tasks/{tid}/cancel", 202)
    assert body["result"]["status"] in ("cancelling", "cancelled")

    async def cancelled() -> bool:
        return (await record(http, b.url, tid))["status"] == "cancelled"

    await until(cancelled, 5)  # the worker's coroutine unwound and reported it


async def test_a_killed_process_leaves_nothing_looking_alive(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tids = [(await call(http, "POST", f"{w.url}/spawn?seconds=60"))["task_id"] for _ in range(3)]
    assert w.proc is not None
    w.proc.kill()
    killed_at = time.monotonic()

    async def lost() -> bool:
        recs = [await record(http, b.url, t) for t in tids]
        return all(r["status"] == "failed" for r in recs)

    await until(lost, 12)
    assert time.monotonic() - killed_at < 10
    for t in tids:
        assert (await record(http, b.url, t))["error"] == "interrupted: process lost"


async def test_a_paused_process_cannot_write_a_stale_outcome(
    trio: Any, worker: Any, http: aiohttp.ClientSession
) -> None:
    space = prefix()
    (b,) = await trio(1, space=space)
    w = await worker(space)
    tid = (await call(http, "POST", f"{w.url}/spawn?seconds=2"))["task_id"]
    assert w.proc is not None
    w.proc.send_signal(signal.SIGSTOP)

    async def lost() -> bool:
        return (await record(http, b.url, tid))["status"] == "failed"

    await until(lost, 15)
    w.proc.send_signal(signal.SIGCONT)

    async def settled() -> bool:
        return (await call(http, "GET", f"{w.url}/runners"))["runners"] == 0

    await until(settled, 10)  # its coroutine ended (or was stopped) after the pause
    rec = await record(http, b.url, tid)
    assert (rec["status"], rec["error"]) == ("failed", "interrupted: process lost")


async def test_heartbeat_timeout_fires_once(
    trio: Any, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    space = prefix()
    a, b, c = await trio(3, space=space)
    body = await call(
        http, "POST", f"{a.url}{API}/tasks", 201, json={"task_type": "hb", "heartbeat_timeout": 1}
    )
    tid = body["result"]["task_id"]

    async def failed() -> bool:
        return (await record(http, c.url, tid))["status"] == "failed"

    await until(failed, 10)
    entries = redis_server.command("XRANGE", "{" + space + "}x", "-", "+").decode()
    assert entries.count(f'"id":"{tid}"') == 2  # created, then failed once: not twice
    assert (await record(http, b.url, tid))["error"] == "heartbeat timeout"
    assert redis_server.command("ZSCORE", "{" + space + "}hb", tid).startswith(b"$-1")


async def test_each_webhook_is_delivered_by_some_process(
    tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    calls: list[tuple[str, bytes]] = []
    app = web.Application()

    async def hook(request: web.Request) -> web.Response:
        calls.append((request.headers["webhook-id"], await request.read()))
        return web.Response(status=204)

    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        space = prefix()
        flags = (
            "--redis", redis_server.url, "--redis-prefix", space,
            "--webhook-secret", "whsec_" + "QUJDREVGR0hJSktMTU5PUA==",
            "--webhook-allow", f"127.0.0.1:{server.port}",
        )  # fmt: skip
        a, b = await start_all([Service(tmp_path, *flags), Service(tmp_path, *flags)])
        try:
            url = f"http://127.0.0.1:{server.port}/hook"
            tids = []
            for i in range(6):
                s = (a, b)[i % 2]
                body = await call(
                    http, "POST", f"{s.url}{API}/tasks", 201,
                    json={"task_type": "w", "callback_url": url},
                )  # fmt: skip
                tids.append(body["result"]["task_id"])
                await call(http, "POST", f"{(b, a)[i % 2].url}{API}/tasks/{tids[-1]}/cancel", 202)

            async def delivered() -> bool:
                return {json.loads(body)["task_id"] for _, body in calls} == set(tids)

            await until(delivered, 15)
            by_task: dict[str, set[str]] = {}
            for wid, body in calls:
                by_task.setdefault(json.loads(body)["task_id"], set()).add(wid)
            assert all(len(ids) == 1 for ids in by_task.values())  # duplicates share an id
        finally:
            for s in (a, b):
                await asyncio.to_thread(s.__exit__, None, None, None)
    finally:
        await server.close()


# --- Redis away -----------------------------------------------------------------------


async def test_redis_stalled_then_back(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    redis = RedisServer(tmp_path / "r").start()
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
            tid = body["result"]["task_id"]
            redis.pause()
            started = time.monotonic()
            async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            assert time.monotonic() - started < 5
            async with http.post(f"{s.url}{API}/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 503
            async with http.get(f"{s.url}/health") as resp:
                assert resp.status == 503
            redis.resume()
            back = time.monotonic()

            async def recovered() -> bool:
                async with http.get(f"{s.url}{API}/tasks/{tid}") as resp:
                    return resp.status == 200

            await until(recovered, 10)
            assert time.monotonic() - back < 5
            await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
    finally:
        redis.stop()


async def test_acknowledged_changes_survive_a_redis_restart(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    flags = ("--appendonly", "yes", "--appendfsync", "always")
    redis = RedisServer(tmp_path / "r", *flags).start()
    try:
        async with Service(tmp_path, "--redis", redis.url) as s:
            tids = []
            for _ in range(20):
                body = await call(http, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "x"})
                tids.append(body["result"]["task_id"])
            await call(http, "POST", f"{s.url}{API}/tasks/{tids[0]}/cancel", 202)
            redis.stop(signal.SIGKILL)
            async with http.get(f"{s.url}{API}/tasks/{tids[0]}") as resp:
                assert resp.status == 503
            redis = RedisServer(tmp_path / "r", *flags, port=redis.port).start()

            async def recovered() -> bool:
                async with http.get(f"{s.url}{API}/tasks/{tids[0]}") as resp:
                    return resp.status == 200

            await until(recovered, 10)
            assert (await record(http, s.url, tids[0]))["status"] == "cancelled"
            page = await call(http, "GET", f"{s.url}{API}/tasks?limit=100", 200)
            assert {r["task_id"] for r in page["result"]} == set(tids)
    finally:
        redis.stop()


# --- --workers and flags ----------------------------------------------------------------


async def test_workers_share_one_port_and_one_space(
    tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    s = Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", prefix(), "--workers", "2")
    async with s:
        assert s.proc is not None

        pid = s.proc.pid

        def children() -> list[str]:
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
            return out.stdout.split()

        async def two() -> bool:
            return len(children()) == 2

        await until(two, 15)
        tids = []
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh:  # new connection each time
                body = await call(
                    fresh, "POST", f"{s.url}{API}/tasks", 201, json={"task_type": "w"}
                )
                tids.append(body["result"]["task_id"])
                await record(fresh, s.url, tids[-1])  # visible whichever worker answers
        pids = children()
        assert s.stop() == 0
        # No library warning at start or stop (redis-py warns on a synchronous Retry).
        assert "warn" not in s.log().lower(), s.log()
    gone = await asyncio.to_thread(
        subprocess.run, ["ps", "-o", "stat=", "-p", ",".join(pids)], capture_output=True
    )
    assert all(st.startswith(b"Z") for st in gone.stdout.split())  # exited (or reaped)


def test_redis_flags_are_checked(tmp_path: Path) -> None:
    from .service import cli

    out = cli("serve", "--db", str(tmp_path / "x.db"), "--redis", "redis://127.0.0.1:1/0")
    assert out.returncode == 1 and "exclusive" in out.stderr
    out = cli("serve", "--workers", "2", "--port", str(free_port()))
    assert out.returncode == 1 and "--workers needs --redis" in out.stderr
    out = cli("serve", "--redis", "http://x", "--port", str(free_port()))
    assert out.returncode == 1 and "redis://" in out.stderr
    out = cli("serve", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--port", str(free_port()))
    assert out.returncode == 1 and "cannot be reached" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # that line alone


def test_python_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        taskd.Tracker(store=taskd.MemoryStore(), redis="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="redis://"):
        taskd.Tracker(redis="localhost:6379")
    with pytest.raises(TypeError):
        taskd.Tracker(redis=6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="braces"):
        taskd.Tracker(redis="redis://127.0.0.1:1/0", redis_prefix="{x}")
