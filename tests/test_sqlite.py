"""Durability (docs/reliability.md): the SQLite store, in-process and under a real kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import taskd
from taskd import TaskStatus as S
from taskd.testing import FakeClock, eventually

from .service import Service, cli, wait_for

API = "/api/v1"


async def test_records_round_trip_with_every_field(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        a = await t.create(
            "reindex",
            resource_id="idx",
            metadata={"by": "cron", "n": [1, 2]},
            owner="alice",
            heartbeat_timeout=300,
        )
        await t.start(a.task_id)
        a = await t.progress(a.task_id, 0.25, message="quarter")
        b = await t.create("x")
        await t.start(b.task_id)
        b = await t.complete(b.task_id, {"docs": [1, {"k": None}]})
        c = await t.create("x")
        c = await t.fail(c.task_id, "token=abc")
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        assert await t.get(a.task_id) == a
        assert await t.get(b.task_id) == b
        assert await t.get(c.task_id) == c
        got = await t.get(a.task_id)
        assert got is not None and got.owner == "alice" and got.heartbeat_timeout == 300
        assert [r.task_id for r in await t.list()] == [c.task_id, b.task_id, a.task_id]
        # indexes were rebuilt: dedup and filters work after a restart
        with pytest.raises(taskd.TaskConflict):
            await t.create("reindex", resource_id="idx", owner="alice")
        assert [r.task_id for r in await t.list(status="failed")] == [c.task_id]
        # and new ids still sort after the old ones
        d = await t.create("x")
        assert (await t.list(limit=1))[0].task_id == d.task_id


#: A process that spawns a task and starts an external one, then dies with no
#: shutdown at all (``os._exit``): what a crash leaves in the file.
_CRASH = """
import asyncio, os, sys
import taskd

async def main() -> None:
    async with taskd.Tracker(store=taskd.SQLiteStore(sys.argv[1])) as t:
        handle = await t.spawn(asyncio.sleep(60), task_type="x", resource_id="r")
        external = await t.create("ext")
        await t.start(external.task_id)
        print(handle.task_id, external.task_id, flush=True)
        os._exit(0)

asyncio.run(main())
"""


async def test_in_process_tasks_are_failed_as_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH, str(db), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stdout
    spawned, started = stdout.decode().split()
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as again:
        rec = await again.get(spawned)
        assert rec is not None and rec.status is S.FAILED
        assert rec.error == "interrupted: tracker restarted"
        ext = await again.get(started)
        assert ext is not None and ext.status is S.RUNNING  # external: left as it was
        # the key of the interrupted task is free again
        await again.create("x", resource_id="r")


async def test_ttl_purge_survives_restart(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "t.db"
    retention = taskd.Retention(completed_ttl=100)
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock, retention=retention) as t:
        old = await t.create("x")
        await t.start(old.task_id)
        await t.complete(old.task_id)
        keep = await t.create("x")
    clock.advance(101)
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock, retention=retention) as t:
        assert await t.get(old.task_id) is None
        assert await t.get(keep.task_id) is not None
    with sqlite3.connect(db) as conn:
        ids = {row[0] for row in conn.execute("SELECT task_id FROM tasks")}
    assert ids == {keep.task_id}  # purged from disk, not only from memory


async def test_heartbeat_applies_after_restart(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock) as t:
        rec = await t.create("x", heartbeat_timeout=10)
        await t.start(rec.task_id)
    clock.advance(11)
    async with taskd.Tracker(store=taskd.SQLiteStore(db), clock=clock) as t:
        await t.get(rec.task_id)
        got = await t.get(rec.task_id)
        assert got is not None and got.status is S.FAILED and got.error == "heartbeat timeout"


async def test_second_tracker_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db)):
        with pytest.raises(taskd.StoreError, match="in use"):
            async with taskd.Tracker(store=taskd.SQLiteStore(db)):
                pass


async def test_store_write_failure_refuses_writes_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    t = taskd.Tracker(store=taskd.SQLiteStore(db))
    await t.__aenter__()
    kept = await t.create("x")

    def rename(old: str, new: str) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(f"ALTER TABLE {old} RENAME TO {new}")

    # Fault injection from outside: another connection renames the table under the
    # store's feet, so that its next commit fails in SQLite itself.
    rename("tasks", "hidden")
    with pytest.raises(taskd.StoreError):
        await t.create("y")  # never acknowledged
    assert t.health() is not None and "no such table" in t.health()  # type: ignore[operator]
    with pytest.raises(taskd.StoreError):
        await t.start(kept.task_id)  # refused up front while the store cannot write
    got = await t.get(kept.task_id)  # reads go on
    assert got is not None and got.status == "pending"
    rename("hidden", "tasks")

    async def healthy() -> bool:
        return t.health() is None and (await t.stats())["records"] >= 1

    await eventually(healthy)
    started = await t.start(kept.task_id)  # writes resume by themselves
    await t.aclose()
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as again:
        after = await again.get(kept.task_id)
    assert after is not None and after.status == started.status == "running"


def test_store_options_are_checked() -> None:
    with pytest.raises(TypeError):
        taskd.SQLiteStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        taskd.SQLiteStore("x.db", synchronous="SOMETIMES")


# --- the service -----------------------------------------------------------------


#: The table as schema version 1 wrote it (the text SQLite keeps in every file): the
#: columns derived from the one field list (docs/architecture.md) must stay these.
SCHEMA_V1 = (
    "CREATE TABLE tasks ("
    " task_id TEXT PRIMARY KEY, task_type TEXT NOT NULL, status TEXT NOT NULL,"
    " resource_id TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
    " started_at REAL, finished_at REAL, progress REAL, message TEXT,"
    " result TEXT, error TEXT, metadata TEXT, owner TEXT,"
    " in_process INTEGER NOT NULL, callback_url TEXT, heartbeat_timeout REAL"
    ") WITHOUT ROWID"
)


async def test_the_table_is_derived_from_the_field_list_and_unchanged(tmp_path: Path) -> None:
    from taskd.engine import codec

    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as tracker:
        await tracker.create("x")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'").fetchone()
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(tasks)"))
    # version 1's table, then the columns added since, as SQLite writes ADD COLUMN
    added = (
        ", traceparent TEXT, stage TEXT, parent_id TEXT, children TEXT,"
        " await_children INTEGER, held TEXT, stages TEXT) WITHOUT ROWID"
    )
    assert sql == SCHEMA_V1.replace(") WITHOUT ROWID", added)
    assert columns == codec.COLUMNS


async def test_a_version_1_file_gets_the_added_columns(tmp_path: Path) -> None:
    """A file written before ``traceparent`` existed opens, keeps its records, and
    stores the new field from then on."""
    db = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE taskd_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO taskd_schema VALUES (1)")
        conn.execute(SCHEMA_V1)
        conn.execute(
            "INSERT INTO tasks (task_id, task_type, status, created_at, updated_at, in_process)"
            " VALUES ('0000000000001aaaaaaaaaaaaaaaaaaaaaaaa', 'old', 'pending', 1.0, 1.0, 0)"
        )
        conn.commit()
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as tracker:
        old = await tracker.get("0000000000001aaaaaaaaaaaaaaaaaaaaaaaa")
        assert old is not None and old.task_type == "old" and old.traceparent is None
        new = await tracker.create("new")
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as tracker:
        assert await tracker.get(new.task_id) is not None


async def test_a_file_an_older_taskd_wrote_reads_back(tmp_path: Path) -> None:
    """A version 1 file made by hand, as taskd wrote it before the codec derived its
    columns: every field of its row reads back."""
    db = tmp_path / "old.db"
    tid = "0000000000001" + "ab" * 16  # an id: its instant, then random bits
    now = time.time()  # finished now: not past its TTL when the file is loaded
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE taskd_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO taskd_schema VALUES (1)")
        conn.execute(SCHEMA_V1)
        conn.execute(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tid,
                "x",
                "completed",
                "r",
                now,
                now + 2,
                now + 1,
                now + 2,
                1.0,
                "m",
                '{"a":1}',
                None,
                '{"k":"v"}',
                "alice",
                0,
                "https://h/x",
                9.0,
            ),
        )
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as tracker:
        rec = await tracker.get(tid)
    assert rec is not None
    assert (rec.status, rec.resource_id, rec.started_at, rec.message) == (
        S.COMPLETED,
        "r",
        now + 1,
        "m",
    )
    assert (rec.result, dict(rec.metadata), rec.owner) == ({"a": 1}, {"k": "v"}, "alice")
    assert (rec.callback_url, rec.heartbeat_timeout, rec.in_process) == ("https://h/x", 9.0, False)


def test_corrupt_file_is_a_clear_error_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.db"
    junk = b"this is not a database " * 100
    db.write_bytes(junk)
    s = Service(tmp_path, "--db", str(db)).start(wait=False)
    assert s.proc is not None and s.proc.wait(20) != 0
    s.stop()
    assert "corrupt or not a database" in s.log() and "Traceback" not in s.log()
    assert db.read_bytes() == junk


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    before = db.read_bytes()
    out = cli("serve", "--db", str(db), "--port", "1")
    assert out.returncode != 0 and "not a taskd one" in out.stderr + out.stdout
    assert db.read_bytes() == before


def test_locked_file_second_server_refused(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    with Service(tmp_path, "--db", str(db)):
        second = Service(tmp_path, "--db", str(db)).start(wait=False)
        assert second.proc is not None and second.proc.wait(20) != 0
        second.stop()
        assert "in use by another taskd process" in second.log()


def test_unwritable_paths_are_refused(tmp_path: Path) -> None:
    # /proc takes no new files, even for root (these tests run as root in CI).
    out = cli("serve", "--db", "/proc/taskd-test.db", "--port", "1")
    assert out.returncode != 0 and "cannot use" in out.stderr + out.stdout
    out = cli("serve", "--db", str(tmp_path / "missing-dir" / "tasks.db"), "--port", "1")
    assert out.returncode != 0 and "cannot use" in out.stderr + out.stdout
    out = cli("serve", "--db", str(tmp_path), "--port", "1")  # a directory
    assert out.returncode != 0 and "is a directory" in out.stderr + out.stdout


_RANK = {"pending": 0, "running": 1, "completed": 2, "failed": 2, "cancelled": 2}


#: Tasks acknowledged before the kill: enough that the kill lands mid-load, with
#: commits of every kind (insert, start, complete) in flight.
_UNDER_LOAD = 500


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    s = await asyncio.to_thread(Service(tmp_path, "--db", str(db)).start)
    acked: dict[str, dict[str, Any]] = {}  # task_id -> latest acknowledged record
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with session.post(
                    f"{s.url}{API}/tasks", json={"task_type": "load", "resource_id": f"w{n}-{i}"}
                ) as resp:
                    if resp.status != 201:
                        continue
                    rec = (await resp.json())["result"]
                    acked[rec["task_id"]] = rec
                for step, body in (("start", None), ("complete", {"result": i})):
                    async with session.post(
                        f"{s.url}{API}/tasks/{rec['task_id']}/{step}", json=body
                    ) as resp:
                        if resp.status != 200:
                            break
                        acked[rec["task_id"]] = (await resp.json())["result"]
            except (TimeoutError, aiohttp.ClientError):
                return  # the server is gone

    async with aiohttp.ClientSession() as session:
        workers = [asyncio.ensure_future(worker(session, n)) for n in range(16)]
        await eventually(lambda: len(acked) >= _UNDER_LOAD, timeout=60)
        s.send(signal.SIGKILL)  # mid-load, no shutdown at all
        assert s.proc is not None
        await asyncio.to_thread(s.proc.wait, 10)  # gone: the workers' requests now fail
        stop.set()
        await asyncio.gather(*workers)
    await asyncio.to_thread(s.stop)
    assert len(acked) > 50
    async with Service(tmp_path, "--db", str(db)) as again, aiohttp.ClientSession() as session:
        for task_id, rec in acked.items():
            async with session.get(f"{again.url}{API}/tasks/{task_id}") as resp:
                assert resp.status == 200, task_id
                now = (await resp.json())["result"]
            assert _RANK[now["status"]] >= _RANK[rec["status"]], (rec, now)
            assert now["updated_at"] >= rec["updated_at"]
            if rec["status"] == "completed":
                assert now == rec  # terminal: exactly as acknowledged


def test_restart_after_demo_kill_fails_running_jobs_as_interrupted(tmp_path: Path) -> None:
    import json
    import urllib.request

    db = tmp_path / "tasks.db"
    s = Service(tmp_path, "--demo", "--db", str(db)).start()
    running: list[str] = []

    def some_running() -> bool:
        with urllib.request.urlopen(f"{s.url}{API}/tasks?status=running") as resp:
            running[:] = [r["task_id"] for r in json.loads(resp.read())["result"]]
        return bool(running)

    wait_for(some_running, timeout=20, interval=0.2)
    s.send(signal.SIGKILL)
    s.stop()
    with Service(tmp_path, "--db", str(db)) as again:
        interrupted = 0
        for task_id in running:
            with urllib.request.urlopen(f"{again.url}{API}/tasks/{task_id}") as resp:
                rec = json.loads(resp.read())["result"]
            # a job may have ended in the instant between the listing and the kill
            assert rec["status"] in ("failed", "completed", "cancelled")
            interrupted += rec["error"] == "interrupted: tracker restarted"
        assert interrupted >= 1
        with urllib.request.urlopen(f"{again.url}{API}/tasks?status=running") as resp:
            assert json.loads(resp.read())["result"] == []


async def test_page_tokens_survive_a_restart(tmp_path: Path) -> None:
    """The page-token key is kept in the file (made once, at the first open): a token
    handed out before a restart is accepted after it; another file's is not."""
    path = tmp_path / "t.db"

    async def get(url: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status, await resp.json()

    async with Service(tmp_path, "--db", str(path)) as s, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{s.url}/api/v1/tasks", json={"task_type": "x"}) as resp:
                assert resp.status == 201
    async with Service(tmp_path, "--db", str(path)) as s:
        token = (await get(f"{s.url}/api/v1/tasks?limit=1"))[1]["next_page_token"]
    async with Service(tmp_path, "--db", str(path)) as s:
        status, body = await get(f"{s.url}/api/v1/tasks?limit=1&page_token={token}")
        assert status == 200 and len(body["result"]) == 1
    async with Service(tmp_path, "--db", str(tmp_path / "other.db")) as s:
        assert (await get(f"{s.url}/api/v1/tasks?page_token={token}"))[0] == 400
    async with taskd.Tracker(store=taskd.SQLiteStore(path)) as tracker:
        key = tracker.page_key
    async with taskd.Tracker(store=taskd.SQLiteStore(path)) as tracker:
        assert tracker.page_key == key and len(key) == 32
