"""The operators' view (docs/operations.md): metrics that chart, the Grafana dashboard
built on them, /stats, structured logs and the uvloop option, on a real `taskd serve`."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import taskd

from .conftest import Engine
from .service import Service, wait_for
from .test_serve import create, http

API = "/api/v1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service that has run a few tasks to each end."""
    with Service(tmp_path_factory.mktemp("ops")) as s:
        for end, body in (("complete", {"result": 1}), ("fail", {"error": "boom"})):
            rec = create(s.url, task_type="ingest")
            assert http("POST", f"{s.url}{API}/tasks/{rec['task_id']}/start", {})[0] == 200
            assert http("POST", f"{s.url}{API}/tasks/{rec['task_id']}/{end}", body)[0] == 200
        rec = create(s.url, task_type="mail")
        assert http("POST", f"{s.url}{API}/tasks/{rec['task_id']}/cancel", {})[0] == 202
        assert http("GET", f"{s.url}{API}/tasks/{rec['task_id']}")[0] == 200
        yield s


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url + "/metrics")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_finished_counters_and_histograms(busy: Service) -> None:
    _, text = scrape(busy.url)
    got = samples(text)
    finished = "taskd_tasks_finished_total"
    assert got[(finished, (("status", "completed"), ("task_type", "ingest")))] == 1
    assert got[(finished, (("status", "failed"), ("task_type", "ingest")))] == 1
    assert got[(finished, (("status", "cancelled"), ("task_type", "mail")))] == 1
    # two ingest tasks ran (started, then finished); the cancelled mail task never started
    assert got[("taskd_task_run_seconds_count", (("task_type", "ingest"),))] == 2
    assert ("taskd_task_run_seconds_count", (("task_type", "mail"),)) not in got
    assert got[("taskd_task_wait_seconds_count", (("task_type", "ingest"),))] == 2
    inf = ("taskd_task_run_seconds_bucket", (("le", "+Inf"), ("task_type", "ingest")))
    assert got[inf] == 2
    route = (("method", "POST"), ("route", "/api/v1/tasks"))
    assert got[("taskd_http_request_duration_seconds_count", route)] == 3
    assert got[("taskd_http_request_duration_seconds_sum", route)] > 0


def test_openmetrics_when_the_scraper_asks(busy: Service) -> None:
    ctype, text = scrape(busy.url, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert {"taskd_tasks_finished", "taskd_task_run_seconds", "taskd_http_requests"} <= names
    ctype, _ = scrape(busy.url)
    assert ctype.startswith("text/plain")


def test_grafana_dashboard_queries_only_exported_series(busy: Service) -> None:
    """Every series docs/grafana/taskd.json charts is one /metrics exports."""
    dash = json.loads((ROOT / "docs" / "grafana" / "taskd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    wanted = {name for e in exprs for name in re.findall(r"\btaskd_[a-z_]+", e)}
    assert len(wanted) >= 6
    _, text = scrape(busy.url)
    exported = {name for name, _ in samples(text)}
    assert wanted <= exported, wanted - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "failure ratio", "p50", "p99", "active"):
        assert topic in titles


def test_stats_counts_the_last_hour_per_minute(busy: Service) -> None:
    status, body = http("GET", f"{busy.url}{API}/stats")
    assert status == 200
    rows = body["result"]["finished_per_minute"]
    assert len(rows) == 60
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(r[0] % 60 == 0 for r in rows)
    totals = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    assert totals == [1, 1, 1]


async def test_task_type_label_cap() -> None:
    """More than 100 task types: the first 100 keep their series, the rest add up
    under _other (docs/operations.md)."""

    async def ok() -> int:
        return 1

    async with taskd.Tracker() as t:
        handles = [await t.spawn(ok(), task_type=f"type{i:03d}") for i in range(105)]
        for h in handles:
            assert await h == 1
        stats = await t.stats()
    counters = stats["finished"]
    types = {task_type for task_type, _ in counters.finished}
    assert len(types) == 101 and "_other" in types
    assert counters.finished[("_other", "completed")] == 5
    assert len(counters.run) == 101
    assert sum(h.count for h in counters.wait.values()) == 105


def test_json_logs_one_object_per_line(tmp_path: Path) -> None:
    s = Service(tmp_path, "--log-format", "json").start()
    assert s.stop(signal.SIGTERM) == 0
    lines = [line for line in s.log().splitlines() if line.strip()]
    assert len(lines) >= 3
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    for rec in records:
        assert {"time", "level", "logger", "message"} <= set(rec)
    assert any("serving on" in r["message"] and r["level"] == "INFO" for r in records)
    assert records[-1]["message"] == "stopped"


def test_serve_on_uvloop(tmp_path: Path) -> None:
    with Service(tmp_path, "--loop", "uvloop") as s:
        rec = create(s.url)
        assert http("GET", f"{s.url}{API}/tasks/{rec['task_id']}")[0] == 200
        assert http("GET", s.url + "/health") == (200, {"status": "ok"})


async def test_counters_on_both_engines(engine: Engine) -> None:
    """Transitions are counted as they are made: external reports, coroutines'
    ends, and spawned tasks' zero wait; in process in memory, in Redis (the
    deployment's totals, here one tracker's) with Redis (docs/operations.md)."""

    async def ok() -> str:
        return "done"

    async with taskd.Tracker(**engine) as t:
        rec = await t.create("ext")
        await t.start(rec.task_id)
        await t.fail(rec.task_id, "boom")
        gone = await t.create("ext")
        await t.cancel(gone.task_id)  # pending: cancelled at once, never started
        assert await (await t.spawn(ok(), task_type="inproc")) == "done"
        counters = (await t.stats())["finished"]
    assert counters.finished == {
        ("ext", "failed"): 1,
        ("ext", "cancelled"): 1,
        ("inproc", "completed"): 1,
    }
    assert {k: h.count for k, h in counters.run.items()} == {"ext": 1, "inproc": 1}
    assert {k: h.count for k, h in counters.wait.items()} == {"ext": 1, "inproc": 1}
    assert counters.wait["inproc"].sum == 0
    per_minute = counters.per_minute()  # up to the snapshot's instant
    assert sum(r[1] for r in per_minute) == 1 and sum(r[2] for r in per_minute) == 1
    assert sum(r[3] for r in per_minute) == 1


GUNICORN_APP = """
import logging
import os
import sys

from aiohttp import web

import taskd.web

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")


def create_app() -> web.Application:
    options = {"redis": os.environ["TASKD_REDIS"]} if os.environ.get("TASKD_REDIS") else {}
    app = taskd.web.create_app(**options, redis_prefix=os.environ.get("PREFIX", "taskd:"))

    async def ready(app: web.Application) -> None:
        # after taskd's own start-up (its cleanup_ctx runs first)
        print("READY", os.getpid(), file=sys.stderr, flush=True)

    app.on_startup.append(ready)
    return app
"""


def run_gunicorn(tmp_path: Path, workers: int, env: dict[str, str]) -> str:
    """Run a real gunicorn with aiohttp's worker until each worker has started the
    application; return its log."""
    import os
    import subprocess
    import sys

    from .service import free_port

    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    log_path = tmp_path / "gunicorn.log"
    # HOME: gunicorn's control socket lives under it; one per run, so runs in
    # parallel never share one.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path), **env}
    env.pop("XDG_RUNTIME_DIR", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "gapp:create_app()", "-w", str(workers),
             "-k", "aiohttp.GunicornWebWorker", "-b", f"127.0.0.1:{free_port()}"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {log_path.read_text()}")
            return log_path.read_text().count("READY") >= workers

        try:
            wait_for(ready, timeout=30, interval=0.05)
        finally:
            proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown: nothing to drain
            proc.wait(20)
    return log_path.read_text()


def test_gunicorn_with_many_workers_and_no_shared_store_warns(
    tmp_path: Path, redis_server: Any
) -> None:
    """docs/embedding.md: one WARNING per worker when gunicorn runs more than one
    worker with no shared store (each would answer others' tasks with 404); none with
    one worker or with Redis."""
    from concurrent.futures import ThreadPoolExecutor

    shared = {"TASKD_REDIS": redis_server.url, "PREFIX": "gunicorn-warn:"}
    runs = {"two": (2, {}), "one": (1, {}), "redis": (2, shared)}
    for name in runs:
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(len(runs)) as pool:
        logs = dict(
            zip(runs, pool.map(lambda n: run_gunicorn(tmp_path / n, *runs[n]), runs), strict=True)
        )
    warnings = [line for line in logs["two"].splitlines() if line.startswith("WARNING taskd")]
    assert len(warnings) == 2, logs["two"]
    assert "gunicorn with 2 workers" in warnings[0] and "redis=URL" in warnings[0]
    assert "WARNING" not in logs["one"], logs["one"]
    assert "WARNING taskd" not in logs["redis"], logs["redis"]
