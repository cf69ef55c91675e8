"""Metrics that add up under several processes (docs/operations.md, "With Redis";
docs/scale-out.md): task counters and histograms are the deployment's totals, kept in
Redis by the calls that move tasks, so any process answers the same; per-process
series carry a ``process`` label and every answer holds every live process's. On real
``taskd serve --workers`` processes, real trackers and a real ``redis-server``."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

import taskd
import taskd.web
from taskd.testing import eventually

from .conftest import Engine
from .redis_server import RedisServer
from .service import Service

API = "/api/v1"
ROOT = Path(__file__).resolve().parent.parent
FINISHED = "taskd_tasks_finished_total"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def prefix() -> str:
    return f"metrics-{uuid.uuid4().hex[:10]}:"


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(got: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, lab), v in got.items() if n == name and labels.items() <= dict(lab).items()
    )


def by_process(got: Samples, name: str, **labels: str) -> dict[str, float]:
    """``name`` summed per ``process`` label (the per-process families)."""
    out: dict[str, float] = {}
    for (n, lab), v in got.items():
        d = dict(lab)
        if n == name and "process" in d and labels.items() <= d.items():
            out[d["process"]] = out.get(d["process"], 0.0) + v
    return out


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection for every request: with ``--workers``,
    the kernel hands each one to any worker (``SO_REUSEPORT``), as a scraper's
    fresh connection would be."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, status: int, **kw: Any) -> Any:
    async with http.request(method, url, **kw) as resp:
        body = await resp.json()
        assert resp.status == status, body
        return body


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


async def test_workers_on_one_port_answer_for_the_whole_deployment(
    tmp_path: Path, redis_server: RedisServer, fresh: aiohttp.ClientSession
) -> None:
    """``taskd serve --redis --workers 3``, scraped through its one port on fresh
    connections while 60 tasks are created and completed through it: no scrape's
    ``taskd_tasks_finished_total`` is below the one before (nor any process's
    request counter), each answer holds all three processes, the finished count
    ends at what was completed, and /api/v1/stats says 60 from every worker."""
    n = 60
    s = Service(tmp_path, "--redis", redis_server.url, "--redis-prefix", prefix(), "--workers", "3")
    async with s:
        url = s.url

        async def three_processes() -> bool:
            got = await scrape(fresh, url)
            return len(by_process(got, "taskd_commands_total")) == 3

        await eventually(three_processes, 30, 0.05)
        finished: list[float] = []
        served: dict[str, float] = {}

        async def check_scrape() -> None:
            got = await scrape(fresh, url)
            finished.append(total(got, FINISHED))
            assert finished[-1] >= max(finished), finished
            # every live process, in every answer
            assert len(by_process(got, "taskd_commands_total")) == 3, got
            for proc, count in by_process(got, "taskd_http_requests_total").items():
                assert count >= served.get(proc, 0), (proc, count, served)
                served[proc] = count

        for i in range(n):
            body = await call(fresh, "POST", f"{url}{API}/tasks", 201, json={"task_type": "one"})
            tid = body["result"]["task_id"]
            await call(fresh, "POST", f"{url}{API}/tasks/{tid}/start", 200)
            await call(fresh, "POST", f"{url}{API}/tasks/{tid}/complete", 200, json={})
            if i % 2:
                await check_scrape()
        await check_scrape()
        got = await scrape(fresh, url)
        assert total(got, FINISHED) == n
        assert total(got, FINISHED, task_type="one", status="completed") == n
        assert total(got, "taskd_task_run_seconds_count", task_type="one") == n
        assert total(got, "taskd_task_wait_seconds_count", task_type="one") == n
        assert len(finished) == n // 2 + 1

        async def every_worker_says_n() -> bool:
            # One more /api/v1/stats on a fresh connection (some worker answers it),
            # until each worker's own request counter shows it answered one.
            body = await call(fresh, "GET", f"{url}{API}/stats", 200)
            rows = body["result"]["finished_per_minute"]
            assert sum(r[1] for r in rows) == n and sum(r[2] + r[3] for r in rows) == 0
            got = await scrape(fresh, url)
            stats = by_process(got, "taskd_http_requests_total", route=f"{API}/stats")
            return len(stats) == 3 and all(v > 0 for v in stats.values())

        await eventually(every_worker_says_n, 30, 0.01)


async def test_two_trackers_read_the_same_totals_and_each_others_series(
    redis_server: RedisServer,
) -> None:
    """Two trackers on one space: what either counted (transitions it made, its
    coroutines' ends) is in both answers, with the same per-minute series; each
    answer lists both processes' series, labelled, and a tracker that closes drops
    out of the other's at once (its series are deleted with its liveness key)."""
    space: Engine = {"redis": redis_server.url, "redis_prefix": prefix()}

    async def ok() -> int:
        return 1

    async with taskd.Tracker(**space) as a, taskd.Tracker(**space) as b:
        rec = await a.create("ext")
        await b.start(rec.task_id)
        await a.complete(rec.task_id)
        assert await (await b.spawn(ok(), task_type="inproc")) == 1
        one, two = await a.stats(), await b.stats()
        for stats in (one, two):
            counters = stats["finished"]
            assert counters.finished == {("ext", "completed"): 1, ("inproc", "completed"): 1}
            assert {t: h.count for t, h in counters.wait.items()} == {"ext": 1, "inproc": 1}
            assert counters.wait["inproc"].sum == 0
        assert one["finished"].per_minute() == two["finished"].per_minute()
        names = {p.process for p in one["processes"]}
        assert names == {p.process for p in two["processes"]} and len(names) == 2
        assert one["processes"][0].process != two["processes"][0].process  # each its own first
        text = taskd._metrics.render(one)[0].decode()
        assert all(f'process="{p}"' in text for p in names)
        b_name = two["processes"][0].process
    async with taskd.Tracker(**space) as c:
        names = {p.process for p in (await c.stats())["processes"]}
        assert b_name not in names and len(names) == 1


async def test_transitions_a_sweep_makes_are_counted(redis_server: RedisServer) -> None:
    """A heartbeat timeout happens inside Redis (a sweep, whichever process gets
    there): it is counted like any other failure."""
    async with taskd.Tracker(redis=redis_server.url, redis_prefix=prefix()) as t:
        rec = await t.create("beat", heartbeat_timeout=0.05)
        await t.start(rec.task_id)

        async def counted() -> bool:
            finished = (await t.stats())["finished"].finished
            return finished.get(("beat", "failed")) == 1

        await eventually(counted, 10)
        assert (await t.get(rec.task_id)).status is taskd.TaskStatus.FAILED  # type: ignore[union-attr]


async def test_a_series_that_does_not_parse_is_left_out(redis_server: RedisServer) -> None:
    """A process of another version (or anything else) that left a series taskd cannot
    read under a live process's name: it is left out, the scrape answers."""
    import redis as redis_py

    from taskd.engine.redis import keys

    space = prefix()
    base = "{" + space + "}"
    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    try:
        # alive, so that no sweep removes it before the read
        client.set(base + keys.ALIVE + "elsewhere:1:x", "1", px=60_000)
        client.sadd(base + keys.PROCS, "elsewhere:1:x")
        client.set(base + keys.SERIES + "elsewhere:1:x", "{not json", px=60_000)
        async with taskd.Tracker(redis=redis_server.url, redis_prefix=space) as t:
            stats = await t.stats()
            assert [p.process for p in stats["processes"]] == [stats["processes"][0].process]
            assert b"taskd_commands_total" in taskd._metrics.render(stats)[0]
    finally:
        client.close()


async def test_a_status_emptied_reads_zero(aiohttp_client: Any, engine: Engine) -> None:
    """``taskd_tasks`` has every status of every type seen: a status the last task
    of a type left reads 0, and so does every status once its records are deleted
    (a panel filtered to one type shows 0, not "No data")."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        taskd.web.create_app(**engine)
    )

    async def tasks() -> dict[str, float]:
        resp = await client.get("/metrics")
        got = samples(await resp.text())
        return {
            dict(lab)["status"]: v
            for (n, lab), v in got.items()
            if n == "taskd_tasks" and dict(lab)["task_type"] == "lone"
        }

    everything = {s.value: 0.0 for s in taskd.TaskStatus}
    body = await (await client.post(f"{API}/tasks", json={"task_type": "lone"})).json()
    tid = body["result"]["task_id"]
    assert await tasks() == {**everything, "pending": 1}
    assert (await client.post(f"{API}/tasks/{tid}/start")).status == 200
    assert await tasks() == {**everything, "running": 1}
    assert (await client.post(f"{API}/tasks/{tid}/complete", json={})).status == 200
    assert await tasks() == {**everything, "completed": 1}
    assert (await client.delete(f"{API}/tasks/{tid}")).status == 204
    assert await tasks() == everything


async def test_a_blocked_event_loop_shows_as_lag(aiohttp_client: Any) -> None:
    """``taskd_event_loop_lag_seconds`` (docs/operations.md): how late the loop ran the
    actor's last timer. A wait's deadline falls while the loop is blocked (a
    synchronous call in a handler, say): its timer runs late by at least the rest of
    the block, and the gauge says so."""
    import time

    app = taskd.web.create_app()
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    tracker = taskd.web.get_tracker(app)
    rec = await tracker.create("lag")

    async def lag() -> float:
        resp = await client.get("/metrics")
        return samples(await resp.text())[("taskd_event_loop_lag_seconds", ())]

    wait = asyncio.ensure_future(tracker.poll(rec.task_id, 0.05))

    async def parked() -> bool:
        return (await tracker.stats())["waiters"] == 1

    await eventually(parked)
    time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop is blocked past the deadline)
    assert (await wait).status is taskd.TaskStatus.PENDING
    assert await lag() >= 0.2


def test_the_grafana_dashboard_is_importable_anywhere() -> None:
    """docs/grafana: every rate() and increase() uses ``$__rate_interval`` (it follows
    the scrape interval), and the data source is an input of the import
    (``__inputs``), which every panel and query variable uses."""
    text = (ROOT / "docs" / "grafana" / "taskd.json").read_text()
    dash = json.loads(text)
    (source,) = dash["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${" + source["name"] + "}"}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["datasource"] == wanted for p in dash["panels"])
    assert all(v["datasource"] == wanted for v in dash["templating"]["list"])
    windows = re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", " ".join(exprs))
    assert windows and set(windows) == {"$__rate_interval"}
