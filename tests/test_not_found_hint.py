"""NOT_FOUND's ``details.hint`` (docs/http-api.md, docs/scale-out.md): an id another
process minted since this one started, asked of a process with no shared task space,
gets a 404 saying so and naming ``--redis``; the hint depends on the id alone.

In process with trackers side by side, then over real sockets with two ``taskd serve``
processes and no Redis: the deployment mistake the hint explains."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

import taskd
from taskd.client import TaskdClient
from taskd.engine.ids import NOT_MINTED_HERE
from taskd.testing import FakeClock

from .redis_server import RedisServer
from .service import Service, cli

API = "/api/v1"


def _old_id() -> str:
    """A well-formed id from a day ago: before any tracker of this test opened."""
    return f"{int((time.time() - 86_400) * 1_000_000):013x}" + "A" * 22


def _forged_now() -> str:
    """A well-formed id of this instant that no tracker minted."""
    return f"{int(time.time() * 1_000_000):013x}" + "A" * 22


# --- in process ---------------------------------------------------------------------


async def test_every_command_on_another_trackers_id_carries_the_hint() -> None:
    async with taskd.Tracker() as b, taskd.Tracker() as a:
        tid = (await a.create("job")).task_id
        assert await b.get(tid) is None  # get answers None, as for any unknown id
        assert b.not_found(tid).hint == NOT_MINTED_HERE
        assert "--redis" in NOT_MINTED_HERE
        calls = [
            b.start(tid),
            b.progress(tid, 0.5),
            b.complete(tid),
            b.fail(tid, "x"),
            b.cancel(tid),
            b.delete(tid),
            b.wait(tid, 1),
            b.poll(tid, 1),
        ]
        for call in calls:
            with pytest.raises(taskd.TaskNotFound) as info:
                await call
            assert (info.value.task_id, info.value.hint) == (tid, NOT_MINTED_HERE)
            assert info.value.error_details() == {"task_id": tid, "hint": NOT_MINTED_HERE}
        with pytest.raises(taskd.TaskNotFound) as info:
            await anext(b.watch(tid))
        assert info.value.hint == NOT_MINTED_HERE
        # The other way round too: b's ids on a, since both were open.
        assert a.not_found((await b.create("job")).task_id).hint == NOT_MINTED_HERE


async def test_no_hint_for_what_this_tracker_minted_held_or_predates_it() -> None:
    async with taskd.Tracker() as t:
        mine = await t.create("job", owner="alice")
        gone = await t.create("job")
        await t.cancel(gone.task_id)
        await t.delete(gone.task_id)
        with pytest.raises(taskd.TaskNotFound) as deleted:
            await t.cancel(gone.task_id)
        with pytest.raises(taskd.TaskNotFound) as others:
            await t.cancel(mine.task_id, owner="bob")
        # Another owner's task answers exactly as a deleted one of the same shape.
        assert deleted.value.hint is others.value.hint is None
        assert set(deleted.value.error_details()) == set(others.value.error_details())
        for tid in (_old_id(), "no-such-id", "X" + _forged_now()[1:], _forged_now()[:-1]):
            assert t.not_found(tid).hint is None, tid
        # A well-formed id of this tracker's lifetime that it did not mint: the hint.
        assert t.not_found(_forged_now()).hint == NOT_MINTED_HERE


async def test_the_first_hint_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with taskd.Tracker() as t:
        with caplog.at_level(logging.WARNING, logger="taskd"):
            for _ in range(3):
                with pytest.raises(taskd.TaskNotFound):
                    await t.cancel(_forged_now())
    warnings = [r for r in caplog.records if "minted by another process" in r.getMessage()]
    assert len(warnings) == 1 and "--redis" in warnings[0].getMessage()


async def test_sqlite_records_of_an_earlier_boot_never_get_the_hint(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock) as t:
        first = await t.create("job")
        await t.cancel(first.task_id)
    clock.advance(-60)  # the wall clock stepped back: the file's ids are "from the future"
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock) as t:
        assert await t.get(first.task_id) is not None  # found: held, so no question
        await t.delete(first.task_id)
        with pytest.raises(taskd.TaskNotFound) as info:
            await t.cancel(first.task_id)
        assert info.value.hint is None  # held here once: this process could answer it
        later = await t.create("job")
        assert later.task_id > first.task_id  # ids still sort after the file's
        clock.advance(120)
        forged = f"{int(clock() * 1_000_000):013x}" + "A" * 22
        assert t.not_found(forged).hint == NOT_MINTED_HERE


async def test_a_shared_task_space_never_hints(redis_server: RedisServer) -> None:
    # Two Redis prefixes are two deployments: a miss there is a miss everywhere.
    def space() -> taskd.Tracker:
        return taskd.Tracker(redis=redis_server.url, redis_prefix=f"t-{uuid.uuid4().hex[:12]}:")

    async with space() as a, space() as b:
        tid = (await a.create("job")).task_id
        with pytest.raises(taskd.TaskNotFound) as info:
            await b.cancel(tid)
        assert info.value.hint is None and b.not_found(tid).hint is None
        assert info.value.error_details() == {"task_id": tid}


# --- two `taskd serve` processes, no Redis ------------------------------------------------


def _http(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def _error(answer: tuple[int, Any]) -> dict[str, Any]:
    status, body = answer
    assert status == 404 and body["status"] == "error", answer
    err: dict[str, Any] = body["error"]
    assert err["code"] == "NOT_FOUND"
    return err


async def test_two_servers_without_redis_explain_their_404s(tmp_path: Path) -> None:
    tokens = ("--token", "alice=tok-a", "--token", "bob=tok-b")
    servers = a, b = Service(tmp_path, *tokens), Service(tmp_path, *tokens)
    try:
        # Both start at once; both have started or failed before the test goes on, so
        # that ``finally`` stops whatever did start.
        started = await asyncio.gather(
            *(asyncio.to_thread(s.start) for s in servers), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        await asyncio.to_thread(_check_two_servers, a, b)
        async with TaskdClient(b.url, "tok-a") as client:
            status, body = _http("POST", a.url + API + "/tasks", "tok-a", {"task_type": "job"})
            assert status == 201, body
            with pytest.raises(taskd.TaskNotFound) as info:
                await client.get(body["result"]["task_id"])
            assert info.value.hint is not None and "--redis" in info.value.hint
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers if s.proc is not None))


def _check_two_servers(a: Service, b: Service) -> None:
    status, body = _http("POST", a.url + API + "/tasks", "tok-a", {"task_type": "job"})
    assert status == 201, body
    tid = body["result"]["task_id"]
    task = f"{API}/tasks/{tid}"

    # Created on A, asked of B: every route's 404 carries the hint.
    routes = [
        ("GET", task, None),
        ("GET", task + "?wait=1", None),
        ("GET", task + "/events", None),
        ("DELETE", task, None),
        ("POST", task + "/start", {}),
        ("POST", task + "/progress", {"progress": 0.5}),
        ("POST", task + "/complete", {}),
        ("POST", task + "/fail", {"error": "x"}),
        ("POST", task + "/cancel", {}),
    ]
    answers = []
    for method, path, body in routes:
        err = _error(_http(method, b.url + path, "tok-a", body))
        assert err["details"]["task_id"] == tid, (method, path)
        assert "--redis" in err["details"]["hint"], (method, path)
        answers.append(err)
    assert all(err == answers[0] for err in answers)
    # From the id alone: whoever asks, the same answer.
    assert _error(_http("GET", b.url + task, "tok-b")) == answers[0]

    # On A, another owner's task answers as an id A could have minted and never did.
    others = _error(_http("GET", a.url + task, "tok-b"))
    old = _old_id()
    never = _error(_http("GET", f"{a.url}{API}/tasks/{old}", "tok-b"))
    assert others == {**never, "message": f"task {tid!r} not found", "details": {"task_id": tid}}

    # No hint for an id from before B started, nor for one of no id's shape (unchanged).
    before = _error(_http("GET", f"{b.url}{API}/tasks/{old}", "tok-a"))
    assert before["details"] == {"task_id": old}
    assert _error(_http("GET", f"{b.url}{API}/tasks/no-such-id", "tok-a")) == {
        "code": "NOT_FOUND",
        "message": "task 'no-such-id' not found",
        "details": {"task_id": "no-such-id"},
    }

    # The operator hears of it once per process; the CLI shows the hint on its one line.
    out = cli("get", tid, "--url", b.url, "--token", "tok-a")
    assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"taskd: no such task: {tid} (") and "--redis" in out.stderr
    assert b.log().count("minted by another process") == 1
    assert "minted by another process" not in a.log()
