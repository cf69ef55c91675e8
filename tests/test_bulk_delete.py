"""Bulk delete (docs/http-api.md): the caller's terminal tasks matching the filters,
never an active one, bounded per call with a page token; one command on every engine;
through Python, HTTP, the clients and the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import taskd
from taskd.client import TaskdClient

from .conftest import Engine
from .service import Service, cli

API = "/api/v1"


async def _finished(t: taskd.Tracker, task_type: str, n: int, **kw: Any) -> list[str]:
    ids = []
    for _ in range(n):
        rec = await t.create(task_type, **kw)
        await t.start(rec.task_id)
        await t.complete(rec.task_id, {"ok": True})
        ids.append(rec.task_id)
    return ids


async def test_deletes_matching_terminal_tasks_only(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        done = await _finished(t, "export", 3)
        other = await _finished(t, "import", 2)
        active = await t.create("export")
        failed = await t.create("export")
        await t.fail(failed.task_id, "boom")
        assert await t.delete_many(task_type="export", status="completed") == 3
        for tid in done:
            assert await t.get(tid) is None
        assert [await t.get(x) is not None for x in other] == [True, True]
        assert await t.get(active.task_id) is not None  # active: never deleted
        assert await t.get(failed.task_id) is not None  # another status
        assert await t.delete_many(status="running") == 0  # names no terminal status
        assert await t.delete_many(task_type="export") == 1  # the failed one
        assert await t.get(active.task_id) is not None
        with pytest.raises(ValueError, match="at least one filter"):
            await t.delete_many()
        with pytest.raises(ValueError):
            await t.delete_page(status="completed", limit=0)


async def test_before_and_owner(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        old = await _finished(t, "x", 2, owner="alice")
        cut = time.time()
        await _finished(t, "x", 1, owner="alice")
        bobs = await _finished(t, "x", 2, owner="bob")
        # (the cut sits between the ids' creation instants: ids carry them)
        assert await t.delete_many(before=cut, owner="alice") == 2
        assert all([await t.get(x) is None for x in old])
        assert await t.delete_many(task_type="x", owner="alice") == 1
        assert all([await t.get(x) is not None for x in bobs])  # another owner's stay
        # a "before" past the ids' last instant (2112) is every task, not an error
        assert await t.delete_many(before=7.2e307, owner="bob") == 2


async def test_a_call_is_bounded_and_a_token_goes_on(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        ids = await _finished(t, "many", 7)
        n, cursor = await t.delete_page(task_type="many", limit=3)
        assert n == 3 and cursor is not None
        total = n
        while cursor is not None:
            n, cursor = await t.delete_page(task_type="many", limit=3, cursor=cursor)
            total += n
        assert total == 7
        assert all([await t.get(x) is None for x in ids])


async def test_over_http_the_clients_and_the_cli(serve: Any, tmp_path: Path) -> None:
    client = await serve()
    ids = []
    for _ in range(3):
        resp = await client.post(f"{API}/tasks", json={"task_type": "job"})
        tid = (await resp.json())["result"]["task_id"]
        await client.post(f"{API}/tasks/{tid}/cancel")
        ids.append(tid)
    keep = (await (await client.post(f"{API}/tasks", json={"task_type": "job"})).json())["result"]
    resp = await client.delete(f"{API}/tasks")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "INVALID_ARGUMENT"
    resp = await client.delete(f"{API}/tasks?task_type=job&status=cancelled")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"status": "ok", "result": {"deleted": 3}, "next_page_token": None}
    for tid in ids:
        assert (await client.get(f"{API}/tasks/{tid}")).status == 404
    assert (await client.get(f"{API}/tasks/{keep['task_id']}")).status == 200
    resp = await client.delete(f"{API}/tasks?task_type=job&page_token=forged")
    assert resp.status == 400
    base = str(client.make_url("")).rstrip("/")
    async with TaskdClient(base) as c:
        await c.cancel(keep["task_id"])
        assert await c.delete_many(task_type="job") == 1


def test_the_cli_deletes(tmp_path: Path) -> None:
    import json
    import urllib.request

    with Service(tmp_path) as s:
        for _ in range(2):
            req = urllib.request.Request(
                s.url + API + "/tasks",
                data=json.dumps({"task_type": "old"}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                tid = json.loads(resp.read())["result"]["task_id"]
            cancel = urllib.request.Request(s.url + API + f"/tasks/{tid}/cancel", method="POST")
            urllib.request.urlopen(cancel, timeout=10).read()
        out = cli("delete", "--url", s.url)
        assert out.returncode != 0 and "at least one filter" in out.stderr
        out = cli("delete", "--status", "cancelled", "--type", "old", "--url", s.url)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "deleted 2"
        out = cli("delete", "--before", str(time.time()), "--url", s.url, "--json")
        assert json.loads(out.stdout) == {"deleted": 0}
