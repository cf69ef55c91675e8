"""``stage`` (docs/http-api.md): a short machine-readable name set with progress, kept
in the record, filtered by ``?stage=``, pushed with the record, cleared once
completed; on every engine, through Python, HTTP, the clients and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import taskd
import taskd.web
from taskd.client import TaskdClient
from taskd.testing import eventually

from .conftest import Engine
from .service import Service, cli

API = "/api/v1"


async def test_stage_is_set_with_progress_and_filtered(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        a = await t.create("import")
        await t.start(a.task_id)
        rec = await t.progress(a.task_id, 0.2, stage="fetching")
        assert rec.stage == "fetching" and rec.to_dict()["stage"] == "fetching"
        rec = await t.progress(a.task_id, 0.4, message="page 3")  # stage unchanged
        assert (rec.stage, rec.message) == ("fetching", "page 3")
        rec = await t.progress(a.task_id, stage="parsing")
        assert (rec.stage, rec.progress) == ("parsing", 0.4)
        b = await t.create("import")
        await t.start(b.task_id)
        await t.progress(b.task_id, stage="fetching")
        assert [r.task_id for r in await t.list(stage="parsing")] == [a.task_id]
        assert [r.task_id for r in await t.list(stage="fetching")] == [b.task_id]
        assert await t.list(stage="nowhere") == []
        assert [r.task_id for r in await t.list(status="running", stage="parsing")] == [a.task_id]
        failed = await t.fail(b.task_id, "boom")  # where the work stopped stays
        assert failed.stage == "fetching"
        done = await t.complete(a.task_id, {"ok": True})
        assert done.stage is None  # a completed task has no stage left
        assert await t.list(stage="parsing") == []

        started = asyncio.Event()
        go = asyncio.Event()

        async def job() -> int:
            taskd.report_progress(0.5, "half", stage="crunching")
            started.set()
            await go.wait()
            return 1

        h = await t.spawn(job(), task_type="spawned")
        await started.wait()

        async def staged() -> bool:
            rec = await t.get(h.task_id)
            return rec is not None and rec.stage == "crunching"

        await eventually(staged)
        go.set()
        await h


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "é"])
async def test_a_bad_stage_is_refused(bad: str) -> None:
    async with taskd.Tracker() as t:
        rec = await t.create("x")
        with pytest.raises(ValueError, match="stage"):
            await t.progress(rec.task_id, stage=bad)
        with pytest.raises(TypeError):
            await t.progress(rec.task_id, stage=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stage"):
            taskd.report_progress(0.1, stage=bad)


async def test_stage_over_http_and_the_clients(serve: Any) -> None:
    client = await serve()
    resp = await client.post(f"{API}/tasks", json={"task_type": "x"})
    tid = (await resp.json())["result"]["task_id"]
    await client.post(f"{API}/tasks/{tid}/start")
    resp = await client.post(f"{API}/tasks/{tid}/progress", json={"stage": "parsing"})
    assert resp.status == 200 and (await resp.json())["result"]["stage"] == "parsing"
    resp = await client.post(f"{API}/tasks/{tid}/progress", json={"stage": "no spaces"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"
    resp = await client.get(f"{API}/tasks?stage=parsing")
    assert [r["task_id"] for r in (await resp.json())["result"]] == [tid]
    resp = await client.get(f"{API}/tasks?stage=bad%20stage")
    assert resp.status == 400
    base = str(client.make_url("")).rstrip("/")
    async with TaskdClient(base) as c:
        rec = await c.progress(tid, 0.9, stage="writing")
        assert rec.stage == "writing"
        assert [r.task_id for r in (await c.list(stage="writing")).records] == [tid]


def test_the_cli_table_shows_the_stage(tmp_path: Path) -> None:

    with Service(tmp_path) as s:
        post = s.post
        tid = post("/tasks", {"task_type": "x"})["task_id"]
        post(f"/tasks/{tid}/start", {})
        post(f"/tasks/{tid}/progress", {"stage": "parsing"})
        out = cli("list", "--url", s.url, env={"COLUMNS": "150"})
        assert out.returncode == 0, out.stderr
        assert "running:parsing" in out.stdout


async def test_history_lists_the_stage_changes(engine: Engine) -> None:
    """docs/http-api.md: each stage change is a ``history`` entry (with the status it
    was reported in), by instant, the latest 16 kept; the same on every engine."""
    async with taskd.Tracker(**engine) as t:
        rec = await t.create("import")
        await t.progress(rec.task_id, stage="queued")  # while pending
        await t.start(rec.task_id)
        await t.progress(rec.task_id, 0.1, stage="fetching")
        await t.progress(rec.task_id, 0.2, stage="fetching")  # no change: no entry
        await t.progress(rec.task_id, 0.3, message="page 2")
        await t.progress(rec.task_id, 0.5, stage="parsing")
        done = await t.complete(rec.task_id, 1)
        history: Any = done.to_dict()["history"]
        assert [(e["status"], e.get("stage")) for e in history] == [
            ("pending", None),
            ("pending", "queued"),
            ("running", None),
            ("running", "fetching"),
            ("running", "parsing"),
            ("completed", None),
        ]
        again = await t.get(rec.task_id)
        assert again is not None and again.to_dict()["history"] == history
        many = await t.create("many")
        for i in range(20):
            await t.progress(many.task_id, stage=f"s{i}")
        got = await t.get(many.task_id)
        assert got is not None
        entries: Any = got.to_dict()["history"]
        assert [e["stage"] for e in entries if "stage" in e] == [f"s{i}" for i in range(4, 20)]
