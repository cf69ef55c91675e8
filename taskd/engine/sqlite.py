"""``SQLiteStore``: the durable store, one SQLite file in WAL mode.

The actor is the only writer. It hands each batch's changes to ``write`` and answers
nobody until that write has ended, so every change a caller saw acknowledged is
committed (group commit: one transaction per mailbox batch, or per group of the
batches handled while the previous write was in flight). All SQLite work runs on one
dedicated thread, so disk waits never stall the event loop.

The database file itself holds an exclusive ``flock`` for as long as the store is
open: a second server on the same file — by any path, symlink or hard link — fails at
start instead of corrupting it, and the lock dies with the process, even on
``kill -9``. A file that cannot be opened for writing is refused at start. Each commit
first checks that the file at the path is still the one open; a file deleted or
replaced while serving makes writes fail (``StoreError``) rather than be acknowledged
into an unlinked inode. The actor turns write failures into 503s and retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import os
import secrets
import sqlite3
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Final, TypeVar, TypeVarTuple, Unpack

from .._errors import StoreError
from .._models import TaskRecord
from .codec import ADDED_COLUMNS, COLUMNS, CREATE_TABLE, from_row, to_row

__all__ = ["SQLiteStore", "StoreError"]

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

SCHEMA_VERSION: Final = 1
_SYNC_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

# The columns and the table come from the codec's one field list (the text of
# CREATE_TABLE is what files made before it hold, so schema version 1 stands).
_SELECT: Final = f"SELECT {', '.join(COLUMNS)} FROM tasks ORDER BY task_id"


@functools.lru_cache(maxsize=256)
def _upsert(columns: tuple[int, ...]) -> str:
    """The upsert of a row that sets these columns (by index). ``REPLACE`` writes a new
    row, so every other column is NULL: the same row as one that sets them all to NULL,
    for about half the work (a record leaves most columns NULL)."""
    names = ", ".join(COLUMNS[i] for i in columns)
    return f"INSERT OR REPLACE INTO tasks ({names}) VALUES ({', '.join('?' * len(columns))})"


class SQLiteStore:
    """Keeps task records in a SQLite file; see the module docstring.

    ``synchronous`` is SQLite's fsync setting: ``FULL`` (the default) fsyncs the WAL
    on every commit, surviving power loss; ``NORMAL`` survives a crash or ``kill -9``
    of the process but not of the machine, and is faster.
    """

    persistent = True

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or path-like, not {type(path).__name__}")
        if synchronous.upper() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNC_MODES)}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] = (0, 0)
        #: The deployment's page-token key (set by ``open``): kept in the file, so
        #: every restart accepts the page tokens handed out before it.
        self.page_key: bytes | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, synchronous={self.synchronous!r})"

    async def _run(self, fn: Callable[[Unpack[Ts]], R], *args: *Ts) -> R:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def open(self) -> Sequence[TaskRecord]:
        """Lock the file, check or create the schema, and load every record."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="taskd-sqlite"
        )
        try:
            records = await self._run(self._open_sync)
        except BaseException:
            await self.close()
            raise
        assert isinstance(records, list)
        return records

    def _open_sync(self) -> list[TaskRecord]:
        path = self.path
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a database file")
        # The lock is on the database file itself (its inode), so a second server
        # reaching it through a symlink or a hard link finds it taken. flock locks do
        # not interact with the POSIX locks SQLite takes, and this descriptor stays
        # open until the connection is closed (closing it would drop SQLite's locks).
        try:
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot use {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"{path} is in use by another taskd process") from None
        st = os.fstat(self._lock_fd)
        self._identity = (st.st_dev, st.st_ino)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from None
        self._conn = conn
        try:
            tables = {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if tables and "taskd_schema" not in tables:
                raise StoreError(f"{path} is a SQLite database but not a taskd one; refusing")
            if "taskd_schema" in tables:
                version = conn.execute("SELECT version FROM taskd_schema").fetchone()
                if version is None or version[0] != SCHEMA_VERSION:
                    raise StoreError(
                        f"{path} has taskd schema version {version and version[0]}, "
                        f"this taskd reads version {SCHEMA_VERSION}"
                    )
                conn.execute("PRAGMA quick_check").fetchone()
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")  # fails now, not later, if unwritable
            conn.execute("CREATE TABLE IF NOT EXISTS taskd_schema (version INTEGER NOT NULL)")
            if conn.execute("SELECT count(*) FROM taskd_schema").fetchone()[0] == 0:
                conn.execute("INSERT INTO taskd_schema VALUES (?)", (SCHEMA_VERSION,))
            # The id sorts in creation order, so the primary key is also the load order.
            conn.execute(CREATE_TABLE)
            # Columns added since version 1, additive (a file from before gets them on
            # its first open, NULL in every row it holds).
            have = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            for column, sql in ADDED_COLUMNS:
                if column not in have:
                    conn.execute(f"ALTER TABLE tasks ADD COLUMN {column} {sql}")
            # Additive (no schema version bump): a file from before this table gets it
            # on its first open, and the key is made once and kept.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS taskd_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)"
            )
            conn.execute(
                "INSERT OR IGNORE INTO taskd_meta VALUES ('page_key', ?)",
                (secrets.token_bytes(32),),
            )
            key = conn.execute("SELECT value FROM taskd_meta WHERE name = 'page_key'").fetchone()
            if not isinstance(key[0], bytes) or len(key[0]) < 16:
                raise StoreError(f"{path} holds a page-token key taskd cannot use")
            self.page_key = key[0]
            conn.execute("COMMIT")
            return [from_row(row) for row in conn.execute(_SELECT).fetchall()]
        except StoreError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use {path}: {exc} (corrupt or not a database?)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} holds a record taskd cannot read: {exc}") from None

    def write(
        self, upserts: Collection[TaskRecord], deletes: Collection[str]
    ) -> asyncio.Future[None]:
        """Apply one batch in one transaction; the future is done once it is committed.
        The work starts now, on the store's thread, not when the future is awaited:
        the actor goes on with the next batches meanwhile (a pipelined commit)."""
        assert self._executor is not None
        # Records are immutable, so the writer thread may encode them: the JSON work
        # overlaps with the event loop instead of running on it.
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._write_sync, upserts, deletes)

    def _write_sync(self, upserts: Collection[TaskRecord], deletes: Collection[str]) -> None:
        conn = self._conn
        assert conn is not None
        # A file deleted or replaced under us would take every commit to an inode
        # nobody will open again: refuse rather than acknowledge what cannot survive.
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise StoreError(f"{self.path} was deleted or replaced while in use")
        # The rows by the columns they set (a few shapes: one statement each).
        shapes: dict[tuple[int, ...], list[tuple[object, ...]]] = {}
        for rec in upserts:
            row = to_row(rec)
            columns = tuple([i for i, v in enumerate(row) if v is not None])
            values = tuple([v for v in row if v is not None])
            alike = shapes.get(columns)
            if alike is None:
                shapes[columns] = [values]
            else:
                alike.append(values)
        conn.execute("BEGIN")
        try:
            for columns, rows in shapes.items():
                conn.executemany(_upsert(columns), rows)
            if deletes:
                conn.executemany("DELETE FROM tasks WHERE task_id = ?", [(i,) for i in deletes])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close the database and release the lock; idempotent."""
        if self._executor is None:
            return
        try:
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # after the connection: releases the flock
            self._lock_fd = None
