"""Task trees (docs/trees.md): ``parent_id`` and the ``children`` counts, the parent
rules, ``?parent_id=`` listings, cascading cancel (the parent is ``cancelling`` until
every descendant is terminal), ``await_children``, subtree deletes and retention; on
every engine, through Python and HTTP; and OpenViking's cancel semantics over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import taskd
from taskd import TaskStatus as S
from taskd.client import TaskdClient
from taskd.testing import FakeClock, eventually

from .conftest import Engine

API = "/api/v1"


async def test_children_are_counted_and_listed(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import", owner="alice")
        assert root.parent_id is None and root.to_dict()["children"] == {}
        kids = [await t.create("part", owner="alice", parent_id=root.task_id) for _ in range(3)]
        assert all(k.parent_id == root.task_id for k in kids)
        assert kids[0].to_dict()["parent_id"] == root.task_id
        await t.start(kids[0].task_id)
        await t.start(kids[1].task_id)
        await t.complete(kids[1].task_id, 1)
        rec = await t.get(root.task_id)
        assert rec is not None
        assert dict(rec.children) == {"pending": 1, "running": 1, "completed": 1}
        assert rec.to_dict()["children"] == {"pending": 1, "running": 1, "completed": 1}
        # newest first, paged like any listing, and only the parent's children
        await t.create("other", owner="alice")
        listed = await t.list(parent_id=root.task_id)
        assert [r.task_id for r in listed] == [k.task_id for k in reversed(kids)]
        page = await t.list_page(parent_id=root.task_id, limit=2)
        assert len(page.records) == 2 and page.next_cursor is not None
        rest = await t.list_page(parent_id=root.task_id, limit=2, cursor=page.next_cursor)
        assert [r.task_id for r in rest.records] == [kids[0].task_id]
        assert await t.list(parent_id=root.task_id, status="completed") == [
            await t.get(kids[1].task_id)
        ]
        assert await t.list(parent_id=kids[0].task_id) == []
        # a child removed leaves the parent's counts
        await t.delete(kids[1].task_id)
        rec = await t.get(root.task_id)
        assert rec is not None and dict(rec.children) == {"pending": 1, "running": 1}


async def test_a_parent_must_be_the_owners_and_take_children(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        mine = await t.create("x", owner="alice")
        with pytest.raises(taskd.TaskNotFound):
            await t.create("x", owner="bob", parent_id=mine.task_id)  # another owner's
        with pytest.raises(taskd.TaskNotFound):
            await t.create("x", owner="alice", parent_id="nope")
        await t.start(mine.task_id)
        await t.complete(mine.task_id)
        with pytest.raises(taskd.InvalidTransition, match="add a child"):
            await t.create("x", owner="alice", parent_id=mine.task_id)  # finished
        going = await t.create("x", owner="alice")
        await t.create("x", owner="alice", parent_id=going.task_id)
        await t.start(going.task_id)
        await t.cancel(going.task_id)  # running: cancelling until its worker confirms
        with pytest.raises(taskd.InvalidTransition, match="add a child"):
            await t.create("x", owner="alice", parent_id=going.task_id)
        with pytest.raises(TypeError):
            await t.create("x", parent_id=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await t.create("x", await_children="yes")  # type: ignore[arg-type]


async def test_cancel_cascades_and_the_parent_waits_for_its_subtree(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import")
        await t.start(root.task_id)
        waiting = await t.create("part", parent_id=root.task_id)  # pending
        working = await t.create("part", parent_id=root.task_id)
        await t.start(working.task_id)
        deep = await t.create("part", parent_id=working.task_id)  # a grandchild
        finished = await t.create("part", parent_id=root.task_id)
        await t.start(finished.task_id)
        # finished, with an active child of its own: the cancel reaches it too
        late = await t.create("part", parent_id=finished.task_id)
        await t.complete(finished.task_id, "done")

        rec, changed = await t.cancel_changed(root.task_id)
        assert changed and rec.status is S.CANCELLING
        assert (await t.get(waiting.task_id)).status is S.CANCELLED  # type: ignore[union-attr]
        assert (await t.get(deep.task_id)).status is S.CANCELLED  # type: ignore[union-attr]
        assert (await t.get(late.task_id)).status is S.CANCELLED  # type: ignore[union-attr]
        assert (await t.get(finished.task_id)).status is S.COMPLETED  # type: ignore[union-attr]
        # the running child's worker learns it as any cancel: cancelling
        mid = await t.get(working.task_id)
        assert mid is not None and mid.status is S.CANCELLING

        # repeated cancel: idempotent, unchanged
        again, changed = await t.cancel_changed(root.task_id)
        assert not changed and again.status is S.CANCELLING
        # the root's worker confirms: still cancelling, a descendant is active
        rec = await t.cancel(root.task_id, confirm=True)
        assert rec.status is S.CANCELLING
        with pytest.raises(taskd.InvalidTransition, match="waiting for its children"):
            await t.complete(root.task_id)
        # the last descendant ends: the root is cancelled, with the confirm's reason
        await t.cancel(working.task_id, confirm=True)
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.CANCELLED
        assert dict(got.children) == {"cancelled": 2, "completed": 1}  # direct children


async def test_a_pending_parent_is_cancelling_until_its_children_end(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import")
        child = await t.create("part", parent_id=root.task_id)
        await t.start(child.task_id)
        rec = await t.cancel(root.task_id)
        assert rec.status is S.CANCELLING  # never started, but its child runs
        assert (await t.progress(child.task_id, 0.5)).status is S.CANCELLING
        await t.complete(child.task_id, "finished anyway")
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.CANCELLED


async def test_spawned_children_follow_their_parent(engine: Engine) -> None:
    started = asyncio.Event()

    async def child() -> None:
        started.set()
        await asyncio.Event().wait()

    async def parent(t: taskd.Tracker) -> None:
        h = await t.spawn(child(), task_type="child")  # its parent: this task
        assert h.record.parent_id == taskd_parent[0]
        await h

    taskd_parent: list[str] = []
    async with taskd.Tracker(**engine) as t:
        other = await t.spawn(child(), task_type="loose", owner="bob")
        assert other.record.parent_id is None
        h = await t.spawn(parent(t), task_type="parent")
        taskd_parent.append(h.task_id)
        await started.wait()

        async def has_child() -> bool:
            rec = await t.get(h.task_id)
            return rec is not None and rec.children.get("running") == 1

        await eventually(has_child)
        (kid,) = await t.list(parent_id=h.task_id)
        await t.cancel(h.task_id)
        with pytest.raises(asyncio.CancelledError):
            await h
        rec = await t.wait(h.task_id, timeout=10)
        assert rec.status is S.CANCELLED
        assert (await t.wait(kid.task_id, timeout=10)).status is S.CANCELLED
        await t.cancel(other.task_id)


async def test_await_children_completes_after_the_last_child(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import", await_children=True)
        kids = [await t.create("part", parent_id=root.task_id) for _ in range(2)]
        await t.start(root.task_id)
        rec = await t.complete(root.task_id, {"files": 2})
        assert rec.status is S.RUNNING and rec.result is None and rec.progress == 0.0
        with pytest.raises(taskd.InvalidTransition, match="waiting for its children"):
            await t.complete(root.task_id, {"files": 3})
        with pytest.raises(taskd.InvalidTransition, match="waiting for its children"):
            await t.fail(root.task_id, "boom")
        await t.start(kids[0].task_id)
        await t.complete(kids[0].task_id)
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.RUNNING and got.progress == 0.5
        await t.fail(kids[1].task_id, "one part failed")
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.COMPLETED and got.result == {"files": 2}
        # without children, await_children changes nothing
        alone = await t.create("x", await_children=True)
        await t.start(alone.task_id)
        assert (await t.complete(alone.task_id, 1)).status is S.COMPLETED


async def test_deleting_a_parent_deletes_its_finished_subtree(engine: Engine) -> None:
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import", owner="alice")
        kid = await t.create("part", owner="alice", parent_id=root.task_id)
        grandkid = await t.create("part", owner="alice", parent_id=kid.task_id)
        await t.start(root.task_id)
        await t.complete(root.task_id)
        with pytest.raises(taskd.InvalidTransition, match="active"):
            await t.delete(root.task_id)  # a descendant is active
        assert await t.delete_many(status="completed", owner="alice") == 0  # skipped
        await t.cancel(grandkid.task_id)
        await t.cancel(kid.task_id)
        await t.delete(root.task_id)
        for tid in (root.task_id, kid.task_id, grandkid.task_id):
            assert await t.get(tid) is None
        # bulk delete counts every record of the subtrees it deletes
        tree = await t.create("import", owner="alice")
        await t.create("part", owner="alice", parent_id=tree.task_id)
        await t.cancel(tree.task_id)
        assert await t.delete_many(status="cancelled", owner="alice") == 2
        assert await t.list(owner="alice") == []


async def test_retention_keeps_a_parent_while_a_descendant_is_active() -> None:
    clock = FakeClock()
    retention = taskd.Retention(completed_ttl=10.0)
    async with taskd.Tracker(retention=retention, clock=clock) as t:
        root = await t.create("import")
        kid = await t.create("part", parent_id=root.task_id)
        await t.start(root.task_id)
        await t.complete(root.task_id)
        clock.advance(60)
        assert await t.get(root.task_id) is not None  # kept: its child is active
        await t.start(kid.task_id)
        await t.complete(kid.task_id)
        # its TTL had passed: it goes once its last descendant ends
        assert await t.get(root.task_id) is None
        child = await t.get(kid.task_id)
        assert child is not None and child.parent_id == root.task_id  # its own TTL
        clock.advance(60)
        assert await t.get(kid.task_id) is None


async def test_a_held_outcome_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        root = await t.create("import", await_children=True)
        kid = await t.create("part", parent_id=root.task_id)
        await t.start(root.task_id)
        await t.complete(root.task_id, {"n": 1})
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        rec = await t.get(root.task_id)
        assert rec is not None and rec.status is S.RUNNING and dict(rec.children) == {"pending": 1}
        assert [r.task_id for r in await t.list(parent_id=root.task_id)] == [kid.task_id]
        await t.start(kid.task_id)
        await t.complete(kid.task_id)
        rec = await t.get(root.task_id)
        assert rec is not None and rec.status is S.COMPLETED and rec.result == {"n": 1}


# --- over HTTP --------------------------------------------------------------------

TOKENS = {"tok-a": "alice", "tok-b": "bob"}


def _auth(request: web.Request) -> str:
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    owner = TOKENS.get(token)
    if owner is None:
        raise web.HTTPUnauthorized()
    return owner


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_trees_over_http(serve: Any) -> None:
    client = await serve(auth=_auth)
    a, b = _as("tok-a"), _as("tok-b")

    async def post(path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        resp = await client.post(f"{API}{path}", json=body, headers=headers)
        return resp.status, await resp.json()

    status, body = await post("/tasks", {"task_type": "import", "await_children": True}, a)
    assert status == 201
    root = body["result"]
    assert root["parent_id"] is None and root["children"] == {}
    status, body = await post("/tasks", {"task_type": "part", "parent_id": root["task_id"]}, a)
    assert status == 201 and body["result"]["parent_id"] == root["task_id"]
    kid = body["result"]["task_id"]
    # another owner's parent is as a missing one
    status, body = await post("/tasks", {"task_type": "part", "parent_id": root["task_id"]}, b)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await post("/tasks", {"task_type": "part", "parent_id": 7}, a)
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    status, body = await post("/tasks", {"task_type": "p", "await_children": "yes"}, a)
    assert status == 400
    resp = await client.get(f"{API}/tasks", params={"parent_id": root["task_id"]}, headers=a)
    assert [r["task_id"] for r in (await resp.json())["result"]] == [kid]
    resp = await client.get(f"{API}/tasks", params={"parent_id": root["task_id"]}, headers=b)
    assert (await resp.json())["result"] == []
    # await_children: complete is accepted (200) and the parent stays running
    await post(f"/tasks/{root['task_id']}/start", {}, a)
    status, body = await post(f"/tasks/{root['task_id']}/complete", {"result": 42}, a)
    assert status == 200 and body["result"]["status"] == "running"
    await post(f"/tasks/{kid}/start", {}, a)
    await post(f"/tasks/{kid}/complete", {}, a)
    resp = await client.get(f"{API}/tasks/{root['task_id']}", headers=a)
    body = await resp.json()
    assert body["result"]["status"] == "completed" and body["result"]["result"] == 42
    assert body["result"]["children"] == {"completed": 1}
    # a page token of a children listing is bound to its parent
    for _ in range(2):
        await post("/tasks", {"task_type": "late"}, a)
    resp = await client.get(f"{API}/tasks", params={"limit": "1"}, headers=a)
    token = (await resp.json())["next_page_token"]
    resp = await client.get(
        f"{API}/tasks",
        params={"limit": "1", "parent_id": root["task_id"], "page_token": token},
        headers=a,
    )
    assert resp.status == 400


async def test_openviking_cancel_semantics_over_http(serve: Any) -> None:
    """OpenViking's import task: cancelling it stops new work at once, cancels its
    active work, and the task is ``cancelled`` only after all owned work settles;
    a repeated cancel is idempotent (200, unchanged)."""
    client = await serve()
    base = str(client.make_url("")).rstrip("/")
    async with TaskdClient(base) as c:
        job = await c.create("resource_import")
        await c.start(job.task_id)
        queued = await c.create("embed", parent_id=job.task_id)
        active = await c.create("embed", parent_id=job.task_id)
        await c.start(active.task_id)
        assert [r.task_id for r in (await c.list(parent_id=job.task_id)).records] == [
            active.task_id,
            queued.task_id,
        ]
        resp = await client.post(f"{API}/tasks/{job.task_id}/cancel", json={})
        assert resp.status == 202 and (await resp.json())["result"]["status"] == "cancelling"
        # no new work under it
        resp = await client.post(
            f"{API}/tasks", json={"task_type": "embed", "parent_id": job.task_id}
        )
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "FAILED_PRECONDITION"
        assert (await c.get(queued.task_id)).status is S.CANCELLED
        # the active work learns it as any worker does, and the job waits for it
        assert (await c.progress(active.task_id, 0.7)).status is S.CANCELLING
        await c.cancel(job.task_id, confirm=True)  # the job's own worker stopped
        resp = await client.post(f"{API}/tasks/{job.task_id}/cancel", json={})
        assert resp.status == 200 and (await resp.json())["result"]["status"] == "cancelling"
        await c.cancel(active.task_id, confirm=True)
        rec = await c.get(job.task_id)
        assert rec.status is S.CANCELLED and dict(rec.children) == {"cancelled": 2}
        resp = await client.post(f"{API}/tasks/{job.task_id}/cancel", json={})
        assert resp.status == 200 and (await resp.json())["result"]["status"] == "cancelled"
        # the whole import is deleted at once
        resp = await client.delete(f"{API}/tasks/{job.task_id}")
        assert resp.status == 204
        resp = await client.get(f"{API}/tasks/{active.task_id}")
        assert resp.status == 404


def test_the_cli_lists_a_parents_children(tmp_path: Path) -> None:
    import json

    from .service import Service, cli

    with Service(tmp_path) as s:
        post = s.post
        root = post("/tasks", {"task_type": "import"})["task_id"]
        kids = [post("/tasks", {"task_type": "part", "parent_id": root})["task_id"] for _ in "ab"]
        post("/tasks", {"task_type": "loose"})
        out = cli("list", "--parent", root, "--url", s.url, "--json")
        assert out.returncode == 0, out.stderr
        assert [r["task_id"] for r in json.loads(out.stdout)["tasks"]] == kids[::-1]
        out = cli("list", "--url", s.url, env={"COLUMNS": "150"})
        assert out.returncode == 0, out.stderr
        assert "import +2" in out.stdout  # a parent shows its number of children


async def test_a_pending_parent_cannot_complete(engine: Engine) -> None:
    """The transition table holds for a parent that awaits its children: a pending
    one cannot complete (nothing is held), and its children are unaffected."""
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import", await_children=True)
        kid = await t.create("part", parent_id=root.task_id)
        with pytest.raises(taskd.InvalidTransition, match="pending"):
            await t.complete(root.task_id, 1)
        await t.cancel(kid.task_id)  # the last child ends: nothing to apply
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.PENDING


async def test_a_working_parent_is_cancelled_once_its_subtree_settles(engine: Engine) -> None:
    """docs/trees.md: an external parent whose descendants are still active after its
    cancel cascaded waits for its subtree, not for its own worker: it is cancelled once
    the last descendant is terminal. Without active descendants left, its worker
    confirms as for any task."""
    async with taskd.Tracker(**engine) as t:
        root = await t.create("import")
        await t.start(root.task_id)
        kid = await t.create("part", parent_id=root.task_id)
        await t.start(kid.task_id)
        assert (await t.cancel(root.task_id, reason="user")).status is S.CANCELLING
        await t.complete(kid.task_id, "finished before it noticed")
        got = await t.get(root.task_id)
        assert got is not None and got.status is S.CANCELLED and got.error == "user"
        alone = await t.create("import")
        await t.start(alone.task_id)
        await t.create("part", parent_id=alone.task_id)  # pending: cancelled at once
        assert (await t.cancel(alone.task_id)).status is S.CANCELLING
        assert (await t.get(alone.task_id)).status is S.CANCELLING  # type: ignore[union-attr]
        assert (await t.cancel(alone.task_id, confirm=True)).status is S.CANCELLED
