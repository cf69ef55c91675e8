"""Durability (docs/reliability.md): the SQLite store, in-process and under a real kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import taskd
from taskd import TaskStatus as S
from taskd.actor import messages as m
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


async def test_a_value_a_later_version_clears_is_cleared_in_the_file(tmp_path: Path) -> None:
    """A row is written with the columns its record sets (the others NULL): a value
    an earlier version set and a later one clears is gone from the file too."""
    db = tmp_path / "t.db"
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        rec = await t.create("x", metadata={"k": "v"})
        await t.start(rec.task_id)
        staged = await t.progress(rec.task_id, 0.5, message="half", stage="copy")
        assert staged.message == "half" and staged.stage == "copy"
        done = await t.complete(rec.task_id, 7)
        assert done.message is None and done.stage is None
    with contextlib.closing(sqlite3.connect(db)) as conn:
        message, stage, result = conn.execute(
            "SELECT message, stage, result FROM tasks WHERE task_id = ?", (rec.task_id,)
        ).fetchone()
    assert (message, stage, result) == (None, None, "7")
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:
        assert await t.get(rec.task_id) == done


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


# --- the pipelined commit (docs/architecture.md, the mailbox loop) ------------------------


class HeldStore(taskd.SQLiteStore):
    """A real SQLite file whose writes can be held: each write says it began
    (``began``), then waits for ``gate`` before it runs. Only the timing is the test's."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.began = threading.Event()

    def _write_sync(self, upserts: Collection[taskd.TaskRecord], deletes: Collection[str]) -> None:
        self.began.set()
        self.gate.wait(30)  # (a guard: the test opens it)
        super()._write_sync(upserts, deletes)

    def hold(self) -> None:
        self.began.clear()
        self.gate.clear()

    async def in_flight(self) -> None:
        """Return once a write has begun (and waits at the gate)."""
        assert await asyncio.to_thread(self.began.wait, 10)


def on_disk(db: Path, task_id: str) -> str | None:
    """The status the file holds for ``task_id`` (read by another connection)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT status FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    return None if row is None else str(row[0])


def typed(db: Path, task_type: str) -> list[tuple[str, str]]:
    """(id, status) of the file's records of ``task_type``."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT task_id, status FROM tasks WHERE task_type = ? ORDER BY task_id", (task_type,)
        )
        return [(str(i), str(s)) for i, s in rows]


async def handled(t: taskd.Tracker, before: int, count: int = 1) -> None:
    """Return once the actor has handled ``count`` messages sent after it read ``before``."""
    await eventually(lambda: t._actor.commands >= before + count)


def rename(db: Path, old: str, new: str) -> None:
    """Fault injection from outside: another connection renames the table under the
    store's feet, so that its next commit fails in SQLite itself."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def test_every_acknowledged_change_is_in_the_file_after_close(tmp_path: Path) -> None:
    """Many concurrent callers, each change acknowledged while other batches are being
    written: after close, the file holds every acknowledged record as acknowledged
    (terminal ones exactly)."""
    db = tmp_path / "t.db"
    acked: dict[str, taskd.TaskRecord] = {}

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as t:

        async def spawner(n: int) -> None:
            for i in range(20):
                handle = await t.spawn(work(i), task_type="s", metadata={"n": n})
                acked[handle.task_id] = handle.record
                assert await handle == i
                acked[handle.task_id] = handle.record  # the terminal record, once awaited

        async def worker(n: int) -> None:
            for i in range(10):
                rec = await t.create("e", resource_id=f"{n}-{i}")
                acked[rec.task_id] = rec
                acked[rec.task_id] = await t.start(rec.task_id)
                acked[rec.task_id] = await t.progress(rec.task_id, 0.5, message="half")
                if i % 3:
                    acked[rec.task_id] = await t.complete(rec.task_id, {"i": i})

        await asyncio.gather(*(spawner(n) for n in range(25)), *(worker(n) for n in range(25)))
    assert len(acked) == 25 * 20 + 25 * 10
    async with taskd.Tracker(store=taskd.SQLiteStore(db)) as again:
        for task_id, rec in acked.items():
            now = await again.get(task_id)
            assert now is not None, task_id
            if rec.status in (S.COMPLETED, S.FAILED, S.CANCELLED):
                assert now == rec
            else:  # only the worker's records stay active: as last acknowledged
                assert (now.status, now.progress, now.updated_at) == (
                    rec.status,
                    rec.progress,
                    rec.updated_at,
                )


async def test_no_reply_before_its_record_is_on_disk_and_in_order(tmp_path: Path) -> None:
    """While a write is held, the actor goes on: the next batch's command is handled
    (its record exists in memory) but not answered, and its spawn does not run. Each
    caller hears only once its record is in the file, in the order of the writes."""
    db = tmp_path / "t.db"
    store = HeldStore(db)
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        return "done"

    async with taskd.Tracker(store=store) as t:
        store.hold()
        heard: list[tuple[str, str | None]] = []

        def heard_of(name: str) -> Callable[[asyncio.Future[taskd.TaskRecord]], None]:
            def done(fut: asyncio.Future[taskd.TaskRecord]) -> None:
                rec = fut.result()
                heard.append((name, on_disk(db, rec.task_id)))  # in the file already

            return done

        before = t._actor.commands
        first = asyncio.ensure_future(t.create("a"))
        first.add_done_callback(heard_of("a"))
        await store.in_flight()  # the write of "a" has begun, and is held
        await handled(t, before)
        before = t._actor.commands
        second = asyncio.ensure_future(t.spawn(work(), task_type="b"))
        await handled(t, before)  # "b" handled while "a" is being written
        assert not first.done() and not second.done() and not started.is_set()
        assert typed(db, "b") == []
        store.gate.set()
        handle = await second
        assert heard == [("a", "pending")]  # "a" was answered first, once written
        assert typed(db, "b") == [(handle.task_id, "running")]
        assert await handle == "done" and started.is_set()
    assert typed(db, "b") == [(handle.task_id, "completed")]


async def test_a_failed_write_fails_its_callers_and_those_handled_behind_it(
    tmp_path: Path,
) -> None:
    """The write in flight fails: its callers get ``StoreError`` (503), and so do those
    of the batch handled while it was in flight (accepted before the failure was
    known); none of their spawns runs. Once the store writes again, what they were
    refused is recorded so."""
    db = tmp_path / "t.db"
    store = HeldStore(db)
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    coros = [work(), work()]
    t = taskd.Tracker(store=store)
    await t.__aenter__()
    try:
        store.hold()
        before = t._actor.commands
        first = asyncio.ensure_future(t.spawn(coros[0], task_type="a"))
        await store.in_flight()
        await handled(t, before)
        before = t._actor.commands
        behind = [
            asyncio.ensure_future(t.spawn(coros[1], task_type="b")),
            asyncio.ensure_future(t.create("c")),
            asyncio.ensure_future(t.stats()),
        ]
        await handled(t, before, len(behind))
        rename(db, "tasks", "hidden")
        store.gate.set()
        for fut in (first, *behind):
            with pytest.raises(taskd.StoreError):
                await asyncio.wait_for(fut, 10)
        assert t.health() is not None and "no such table" in t.health()  # type: ignore[operator]
        assert not ran.is_set()
        assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in coros)
        rename(db, "hidden", "tasks")
        await eventually(lambda: t.health() is None)
        stored = typed(db, "a") + typed(db, "b")
        assert [status for _, status in stored] == ["failed", "failed"]
        for task_id, _ in stored:
            rec = await t.get(task_id)
            assert rec is not None and rec.error == "not started: the store cannot write"
    finally:
        store.gate.set()
        await t.aclose()
    assert not ran.is_set()


async def test_close_with_writes_in_flight_waits_for_their_spawns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing while spawns are still being written: they are acknowledged once
    written, their runners start, and shutdown waits for them like any other (Drain
    answers with them); nothing hangs, and the file holds them completed."""
    db = tmp_path / "t.db"
    store = HeldStore(db)
    release = asyncio.Event()

    async def work(i: int) -> int:
        await release.wait()
        return i

    t = taskd.Tracker(store=store, close_timeout=30)
    await t.__aenter__()
    actor = t._actor
    drains: list[asyncio.Future[Any]] = []
    ask = actor.ask

    def asked(msg: Any) -> asyncio.Future[Any]:
        fut = ask(msg)
        if isinstance(msg, m.Drain):
            drains.append(fut)
        return fut

    monkeypatch.setattr(actor, "ask", asked)
    store.hold()
    before = actor.commands
    spawns = [asyncio.ensure_future(t.spawn(work(0), task_type="x"))]
    await store.in_flight()
    await handled(t, before)
    before = actor.commands
    spawns += [asyncio.ensure_future(t.spawn(work(i), task_type="x")) for i in range(1, 20)]
    await handled(t, before, 19)
    closing = asyncio.ensure_future(t.aclose())
    await eventually(lambda: actor.draining)  # Drain's batch waits for the writes
    assert not any(s.done() for s in spawns) and not closing.done()
    store.gate.set()
    handles = [await asyncio.wait_for(s, 10) for s in spawns]
    (drain,) = drains
    waited_for = await asyncio.wait_for(drain, 10)
    assert set(waited_for) == {h.task_id for h in handles}
    release.set()
    await asyncio.wait_for(closing, 30)
    assert [await h for h in handles] == list(range(20))
    assert [status for _, status in typed(db, "x")] == ["completed"] * 20


async def test_a_timeout_that_passes_while_its_spawn_is_written(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A spawn's timeout passes before its write ends (its runner not started yet):
    the runner is cancelled as it starts, and the task fails with the timeout."""
    store = HeldStore(tmp_path / "t.db")
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()
        await asyncio.Event().wait()

    async with taskd.Tracker(store=store, clock=clock) as t:
        store.hold()
        before = t._actor.commands
        spawned = asyncio.ensure_future(t.spawn(work(), task_type="x", timeout=1))
        await store.in_flight()
        await handled(t, before)
        clock.advance(2)
        before = t._actor.commands
        stats = asyncio.ensure_future(t.stats())  # a batch: its due timers fire first
        await handled(t, before)
        store.gate.set()
        handle = await asyncio.wait_for(spawned, 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle, 10)
        await stats
        rec = await t.get(handle.task_id)
        assert rec is not None and rec.status is S.FAILED and rec.error is not None
        assert rec.error.startswith("timeout")
        assert not ran.is_set()


async def test_a_cancel_reaching_a_spawn_still_being_written(tmp_path: Path) -> None:
    """A cancel cascades to a child whose spawn is still being written (its runner not
    started): the child is cancelled and its coroutine never runs."""
    store = HeldStore(tmp_path / "t.db")
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    async with taskd.Tracker(store=store) as t:
        parent = await t.create("p")
        store.hold()
        before = t._actor.commands
        spawned = asyncio.ensure_future(
            t.spawn(work(), task_type="child", parent_id=parent.task_id)
        )
        await store.in_flight()
        await handled(t, before)
        before = t._actor.commands
        cancel = asyncio.ensure_future(t.cancel(parent.task_id))
        await handled(t, before)
        store.gate.set()
        handle = await asyncio.wait_for(spawned, 10)
        await asyncio.wait_for(cancel, 10)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(handle, 10)
        child = await t.get(handle.task_id)
        assert child is not None and child.status is S.CANCELLED
        assert not ran.is_set()


async def test_a_write_that_fails_at_once_is_a_failed_write(tmp_path: Path) -> None:
    """A store whose ``write`` raises before returning an awaitable: its callers get
    ``StoreError`` like any failed write's, and the loop goes on."""

    class Broken(taskd.SQLiteStore):
        broken = False

        def write(
            self, upserts: Collection[taskd.TaskRecord], deletes: Collection[str]
        ) -> asyncio.Future[None]:
            if self.broken:
                raise taskd.StoreError("the disk is gone")
            return super().write(upserts, deletes)

    store = Broken(tmp_path / "t.db")
    async with taskd.Tracker(store=store) as t:
        kept = await t.create("x")
        store.broken = True
        with pytest.raises(taskd.StoreError, match="the disk is gone"):
            await t.create("y")
        assert (await t.get(kept.task_id)) == kept  # reads go on
        store.broken = False
        await eventually(lambda: t.health() is None)
        assert (await t.start(kept.task_id)).status is S.RUNNING
