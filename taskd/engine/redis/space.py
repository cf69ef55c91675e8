"""``RedisSpace``: one task space shared by many processes, held in Redis.

Redis is the serial owner of shared state, as the actor is of local state: every
command is one call of a server-side Lua function (``script.lua``, a Redis Functions
library loaded with ``FUNCTION LOAD`` and run with ``FCALL``), atomic, with the
transition table generated from ``_models.TRANSITIONS``. A process's actor sends
each mailbox batch as one pipeline (group commit). This module is the wire: the
library's text, the connection, and the record hash decoded through ``codec``.
``engine.RedisEngine`` is the engine that uses it.

Keys all start with ``{prefix}``: one hash tag, so one deployment lives in one Redis
Cluster slot; every suffix is named in ``keys``, with the legend.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

from ..._counters import BUCKETS, MAX_TASK_TYPES, OTHER
from ..._errors import (
    InvalidTransition,
    QuotaExceeded,
    StoreError,
    TaskConflict,
    TaskdError,
    TaskNotFound,
    TrackerFull,
)
from ..._models import (
    ANY_OWNER,
    JSON,
    OwnerScope,
    TaskRecord,
)
from ..._retention import Retention
from ..codec import PAYLOAD, REDIS_FIELDS
from ..rules import lua_tables
from . import keys
from .cluster import Nodes
from .decoder import Decoder, decode_record
from .shards import Shards
from .wire import READ_TIMEOUT, Wire

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["RedisSpace", "check_redis_url", "decode_record"]

log = logging.getLogger("taskd")

#: Seconds a Redis call may take before the batch fails with 503.
SOCKET_TIMEOUT: Final = READ_TIMEOUT
#: Entries the change stream keeps (``MAXLEN ~``): how far back a reader can fall.
STREAM_LEN: Final = 10_000

#: The one eviction policy that never drops a key behind taskd's back.
POLICY: Final = "noeviction"
#: Error replies of a Redis that is up but refuses writes (full under noeviction,
#: a read-only replica, a failed RDB save with stop-writes-on-bgsave-error).
REFUSALS: Final = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "NOTREADY")

#: One server-side command: (name, arguments); an upper-case name is a plain Redis
#: command, any other a command of the script.
Command = tuple[str, Sequence[str]]


#: Script commands that only read: sent to the library's ``no-writes`` function,
#: which Redis runs even when it is over maxmemory (the other one it then refuses).
READS: Final = frozenset({"replay"})

#: Script commands that write a record (``save``): one that succeeds shows that
#: Redis takes writes again.
WRITES: Final = frozenset(
    {"create", "spawn", "start", "progress", "complete", "fail", "cancel", "ended", "timeout"}
    | {"purge"}
)


@dataclass(slots=True)
class Op:
    """One call of a batch's pipeline, and what answers its caller."""

    command: Command
    done: Callable[[Any], object]
    fut: asyncio.Future[Any] | None = None
    #: The message, if it must be sent again after a failure (runner reports).
    retry: object = None
    #: Called when the call fails (Redis unreachable, or an error reply).
    on_error: Callable[[], object] | None = None
    #: The shard a script command runs in (None: the home base).
    base: str | None = None


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _tally() -> str:
    """``tally.lua`` (the deployment's task counters), with the histogram bounds, the
    type cap and ``_other`` of ``taskd._counters`` and the per-minute expiry of
    ``keys``: one source of each."""
    constants = "\n".join(
        (
            "local BUCKETS = {" + ", ".join(map(repr, BUCKETS)) + "}",
            f"local MAX_TYPES = {MAX_TASK_TYPES}",
            f"local OTHER = '{OTHER}'",
            f"local MINUTES_TTL = {keys.MINUTES_TTL}",
        )
    )
    return _read("tally.lua").replace("@COUNTERS@", constants)


def _script() -> str:
    # (one library, in four files: each part in its place, sharing the locals)
    text = _read("script.lua").replace("@TREES@", _read("trees.lua"))
    text = text.replace("@SWEEP@", _read("sweep.lua")).replace("@TALLY@", _tally())
    text = text.replace("@RULES@", lua_tables(REDIS_FIELDS, PAYLOAD))
    return text.replace("@KEYS@", keys.lua_table())


#: The library's code as rendered (function names still ``@NAME@``), and its SHA1.
SCRIPT = _script()
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
#: The library's name, and that of its function for every command; ``FUNCTION``
#: (read-only: ``no-writes``) for the commands in ``READS``. Versioned by the code's
#: hash: two taskd versions sharing one Redis each load and call their own.
FUNCTION: Final = "taskd_" + SHA[:12]
FUNCTION_RO: Final = FUNCTION + "_ro"
#: What ``FUNCTION LOAD`` takes.
LIBRARY: Final = f"#!lua name={FUNCTION}\n" + SCRIPT.replace("@NAME@", FUNCTION)


def check_redis_url(url: object) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL, else ``ValueError``."""
    if not isinstance(url, str):
        raise TypeError(f"redis must be a URL string, not {type(url).__name__}")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis must be a redis://, rediss:// or unix:// URL, not {url!r}")
    return url


def check_prefix(prefix: object) -> str:
    """A key prefix: non-empty text without braces (it becomes the hash tag)."""
    if not isinstance(prefix, str):
        raise TypeError(f"redis_prefix must be a str, not {type(prefix).__name__}")
    if not prefix or "{" in prefix or "}" in prefix or len(prefix) > 200:
        raise ValueError("redis_prefix must be 1-200 characters without braces")
    return prefix


def scope(owner: OwnerScope) -> str:
    """An owner scope as the script takes it: ``*`` any, ``-`` none, ``s…`` one."""
    if owner is ANY_OWNER:
        return "*"
    return "-" if owner is None else "s" + owner


def opt(value: str | None) -> str:
    return "" if value is None else value


def seconds(value: float) -> str:
    return repr(float(value))


class PolicyError(StoreError):
    """Redis may evict keys (``maxmemory-policy`` is not ``noeviction``); raised to
    callers as a plain ``StoreError``."""


def refusal(reply: object) -> str | None:
    """Why Redis refused a write, if this error reply says it does (else None)."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    # redis-py strips the code of the replies it has a class for
    if isinstance(reply, OutOfMemoryError):
        text = f"OOM {reply}"
    elif isinstance(reply, ReadOnlyError):
        text = f"READONLY {reply}"
    elif isinstance(reply, Exception) and str(reply).startswith(REFUSALS):
        text = str(reply)
    else:
        return None
    return " ".join(text.split())


def _not_loaded(reply: object) -> bool:
    """Whether an error reply says the library's function is not loaded."""
    from redis.exceptions import ResponseError

    # redis-py strips the ERR code: "Function not found"
    return isinstance(reply, ResponseError) and "Function not found" in str(reply)


def raise_error(reply: Sequence[Any]) -> NoReturn:
    """Raise what an ``{'err', …}`` reply of the script means."""
    kind = reply[1]
    if kind == "not_found":
        raise TaskNotFound(reply[2])
    if kind == "invalid":
        raise InvalidTransition(reply[2], reply[3], reply[4])
    if kind == "conflict":
        raise TaskConflict(reply[2], reply[3], reply[4])
    if kind == "quota":
        raise QuotaExceeded(None, int(reply[2]))
    if kind == "full":
        # (with "parents": the finished ones are all parents of active tasks)
        tail = " or their parents" if len(reply) > 3 else ""
        raise TrackerFull(f"all {reply[2]} task slots hold active tasks{tail}")
    raise TaskdError(f"unexpected reply from the shared store: {reply!r}")


class RedisSpace:
    """The connection to one deployment's keys, and the calls the actor makes; on a
    Redis Cluster (``cluster``), routed to each owner's master (``shards``)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        retention: Retention,
        cancel_grace: float,
        *,
        cluster: bool = False,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "a shared task space needs the redis package: pip install 'aiotaskd[redis]'"
            ) from None
        self.url = url
        self.prefix = prefix
        self.shards = Shards(prefix, cluster=cluster)
        #: The home base: tasks without an owner, and the deployment's shared keys.
        self.base = self.shards.home
        self.decode = Decoder()
        quota = retention.max_active_per_owner
        # Every process sends its own settings with each call: a deployment's processes
        # must run with the same retention (docs/scale-out.md).
        self._config = json.dumps(
            {
                "max_tasks": str(retention.max_tasks),
                "quota": None if quota is None else str(quota),
                "ttl_completed": seconds(retention.completed_ttl),
                "ttl_failed": seconds(retention.failed_ttl),
                "ttl_cancelled": seconds(retention.cancelled_ttl),
                "grace": seconds(cancel_grace),
                "stream_len": str(STREAM_LEN),
            }
        )

        def client(timeout: float | None, at: str = url) -> redis.asyncio.Redis:
            # No retries inside redis-py: a failed call becomes a 503 at once and the
            # actor decides when to try again.
            return aioredis.Redis.from_url(
                at,
                decode_responses=True,
                socket_timeout=timeout,
                socket_connect_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
                # RESP2 whatever redis-py's default: no push messages on a connection
                # (the actor's Wire reads one reply per command), replies of one shape
                protocol=2,
            )

        self._policy_checked = False
        self._policy_warned = False
        #: On a cluster: the slot map and a connection per master.
        self.nodes = Nodes(url, lambda at, timeout: client(timeout, at)) if cluster else None
        self.redis = client(SOCKET_TIMEOUT)
        # The actor's own connection for its batches (see _pipeline).
        self._conn: Wire | None = None
        #: For blocking reads (XREAD BLOCK): a connection of its own, longer timeout.
        self.reader = client(SOCKET_TIMEOUT + 2.0)

    def key(self, suffix: str, base: str | None = None) -> str:
        """One of the deployment's keys (under ``base``; the home base by default)."""
        return (base or self.base) + suffix

    async def client(self, key: str, *, reader: bool = False) -> redis.asyncio.Redis:
        """The redis-py client that reaches ``key`` (on a cluster, its master's);
        ``reader``: the one with the longer timeout, for blocking reads."""
        nodes = self.nodes
        if nodes is None:
            return self.reader if reader else self.redis
        await nodes.ensure()
        return nodes.client(nodes.addr_of(key), SOCKET_TIMEOUT + 2.0 if reader else SOCKET_TIMEOUT)

    async def _everywhere(self) -> list[redis.asyncio.Redis]:
        """A client per master (the one Redis, or every master of the cluster)."""
        nodes = self.nodes
        if nodes is None:
            return [self.redis]
        await nodes.ensure()
        return [nodes.client(addr, SOCKET_TIMEOUT) for addr in nodes.masters()]

    def seen(self, text: str | None, owner: OwnerScope) -> TaskRecord | None:
        """The record of a GET's reply (its text, or None), if ``owner`` may see it."""
        if text is None:
            return None
        rec = self.decode(text)[0]
        return rec if owner is ANY_OWNER or rec.owner == owner else None

    async def load_script(self) -> None:
        """Load the server-side library on every master (idempotent: ``REPLACE``)."""
        for client in await self._everywhere():
            await client.function_load(LIBRARY, replace=True)

    async def check_policy(self) -> None:
        """Refuse a Redis that may evict keys (``PolicyError``): under ``allkeys-lru``
        most acknowledged tasks silently became 404 and dedup broke. Where ``CONFIG``
        is not allowed (an ACL, a managed Redis), one WARNING says it could not be
        checked, and taskd goes on."""
        for client in await self._everywhere():
            await self._check_policy(client)
        self._policy_checked = True

    async def _check_policy(self, client: redis.asyncio.Redis) -> None:
        from redis.exceptions import ResponseError

        try:
            reply: Any = await client.config_get("maxmemory-policy")
        except ResponseError as exc:
            if not self._policy_warned:
                self._policy_warned = True
                log.warning(
                    "cannot check Redis's maxmemory-policy (%s): make sure it is %s, "
                    "or Redis may drop tasks behind taskd's back",
                    " ".join(str(exc).split()),
                    POLICY,
                )
            return
        policy = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
        if policy is None:
            if not self._policy_warned:
                self._policy_warned = True
                log.warning("Redis did not say its maxmemory-policy: make sure it is %s", POLICY)
        elif policy != POLICY:
            raise PolicyError(
                f"Redis has maxmemory-policy {policy}; taskd needs {POLICY} (with any other "
                f"policy Redis drops tasks when full): set maxmemory-policy {POLICY} in "
                "its configuration, or CONFIG SET maxmemory-policy noeviction"
            )

    async def page_key(self) -> bytes:
        """The deployment's page-token key: made once (``SET NX``), then read by
        every process, so each accepts the tokens any of them handed out."""
        key = self.key(keys.PAGE_KEY)
        client = await self.client(key)
        value: object = await client.get(key)
        if value is None:
            await client.set(key, secrets.token_hex(32), nx=True)
            value = await client.get(key)
        try:
            if not isinstance(value, str):
                raise TypeError(key)
            return bytes.fromhex(value)
        except (TypeError, ValueError):
            raise StoreError(f"Redis key {key} does not hold a taskd page-token key") from None

    async def call(
        self, commands: Sequence[Command], now: float, bases: Sequence[str | None] | None = None
    ) -> list[Any]:
        """Run one batch of commands as one pipeline; a reply per command (an
        exception object where one failed). A script command runs under its base in
        ``bases`` (the home base where None). Connection failures raise
        ``StoreError``; on a cluster, a master's failure makes its commands' replies
        ``cluster.Down`` instead (the other masters' are answered)."""
        from redis.exceptions import RedisError

        now_s = repr(now)
        now_us = str(math.floor(now * 1_000_000))
        home = self.base
        packed = [
            (name, *args)
            if name.isupper()  # a plain Redis command (a read)
            else (
                "FCALL",
                FUNCTION_RO if name in READS else FUNCTION,
                1,
                (bases[i] if bases is not None else None) or home,
                name,
                now_s,
                now_us,
                self._config,
                *args,
            )
            for i, (name, args) in enumerate(commands)
        ]
        for attempt in (0, 1):
            try:
                if not self._policy_checked:
                    # A new connection (at start, or after one was lost): the Redis
                    # behind it may be another one, or reconfigured.
                    try:
                        await self.check_policy()
                    except PolicyError as exc:
                        # the error table maps exact classes: a plain StoreError
                        raise StoreError(str(exc)) from None
                replies = await self._pipeline(packed)
            except (RedisError, OSError) as exc:
                await self._drop()
                raise StoreError(f"the shared store (Redis) cannot be reached: {exc}") from None
            missing = any(_not_loaded(r) for r in replies)
            if not missing or attempt:
                return replies
            # Redis restarted without persistence, or its functions were flushed: load
            # the library and go again (a command that failed for this did nothing).
            try:
                await self.load_script()
            except (RedisError, OSError) as exc:
                raise StoreError(f"the shared store (Redis) cannot be reached: {exc}") from None
        raise AssertionError("unreachable")

    async def _pipeline(self, packed: list[tuple[object, ...]]) -> list[Any]:
        """Send every command, then read every reply, on the actor's own connection.

        redis-py makes the connection (authentication, TLS, database, protocol) and
        the actor then speaks on it through hiredis directly (``Wire``): redis-py's
        ``Pipeline`` costs ~100 µs more CPU per batch (its command stack, response
        callbacks and pool lock) and even its bare ``pack_command``/``read_response``
        a few µs per command; the actor is this connection's only user, one batch
        at a time, so none of that is needed."""
        if self.nodes is not None:
            return await self._routed(packed)
        wire = self._conn
        if wire is None:
            pool = self.redis.connection_pool
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            wire = self._conn = Wire(conn)
        return await wire.roundtrip(packed)

    async def _routed(self, packed: list[tuple[object, ...]]) -> list[Any]:
        """A batch on a cluster: each command to its key's master (``Nodes``)."""
        assert self.nodes is not None
        routes: list[str] = []
        writes: list[bool] = []
        for i, command in enumerate(packed):
            name = command[0]
            if name == "FCALL":
                routes.append(str(command[3]))
                writes.append(command[1] == FUNCTION)
                continue
            if name == "MULTI":  # with the transaction's first command
                routes.append(str(packed[i + 1][1]))
            elif name == "EXEC":
                routes.append(routes[-1])
            else:
                routes.append(str(command[1]))
            writes.append(name in ("SET", "DEL", "HSET", "HSETNX", "SADD"))
        return await self.nodes.roundtrip(packed, routes, writes)

    async def drop(self) -> None:
        """Close the actor's connection (its state is unknown after a failure)."""
        await self._drop()

    async def _drop(self) -> None:
        self._policy_checked = False  # checked again on the next connection
        if self.nodes is not None:
            await self.nodes.drop()
        wire, self._conn = self._conn, None
        if wire is not None:
            # A reply may be half read: the connection cannot be reused.
            await wire.conn.disconnect()
            await self.redis.connection_pool.release(wire.conn)

    async def aclose(self) -> None:
        """Close every connection."""
        await self._drop()
        await self.redis.aclose()
        await self.reader.aclose()
        if self.nodes is not None:
            await self.nodes.aclose()


class ChangeReader:
    """One reader of the change stream, on a connection of its own (from the reader's
    pool), spoken through a ``Wire`` as the actor's batches are."""

    __slots__ = ("_base", "_client", "_space", "_wire")

    def __init__(self, space: RedisSpace, base: str | None = None) -> None:
        self._space = space
        self._base = base or space.base
        self._wire: Wire | None = None
        self._client: redis.asyncio.Redis | None = None

    async def read(self, after: int, count: int, block_ms: int) -> list[Any]:
        """Entries after sequence number ``after``, waiting up to ``block_ms`` for one:
        ``[entry id, [field, value, …]]`` each."""
        space = self._space
        stream = space.key(keys.CHANGES, self._base)
        wire = self._wire
        if wire is None:
            client = self._client = await space.client(stream, reader=True)
            pool = client.connection_pool
            wire = self._wire = Wire(await pool.get_connection())  # type: ignore[no-untyped-call]
        command = ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", stream)
        try:
            (reply,) = await wire.roundtrip([(*command, f"{after}-0")])
        except BaseException:
            # (cancelled included) a reply may be half read: never reuse the connection
            await self.aclose()
            raise
        if isinstance(reply, Exception):
            raise reply
        return [] if reply is None else list(reply[0][1])

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        wire, self._wire = self._wire, None
        if wire is not None and self._client is not None:
            await wire.conn.disconnect()
            await self._client.connection_pool.release(wire.conn)


def insert_args(new: NewTask, heartbeat: str, random: str) -> tuple[str, ...]:
    """The script's arguments for a new record (owner, type, resource, metadata,
    callback, heartbeat, the id's random part: ``Shards.random_part``, traceparent,
    parent, await_children: "1" or "")."""
    return (
        "-" if new.owner is None else "s" + new.owner,
        new.task_type,
        opt(new.resource_id),
        _metadata(new.metadata),
        opt(new.callback_url),
        heartbeat,
        random,
        opt(new.traceparent),
        opt(new.parent_id),
        # (``Spawn`` has none: a spawned task's coroutine is its own work)
        "1" if getattr(new, "await_children", False) else "",
    )


class NewTask(Protocol):
    """What a new record is made of (``Create`` and ``Spawn`` both carry it)."""

    @property
    def owner(self) -> str | None: ...
    @property
    def task_type(self) -> str: ...
    @property
    def resource_id(self) -> str | None: ...
    @property
    def metadata(self) -> Mapping[str, JSON]: ...
    @property
    def callback_url(self) -> str | None: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def parent_id(self) -> str | None: ...


def _metadata(metadata: Mapping[str, JSON]) -> str:
    if not metadata:
        return ""
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, default=dict)


def ignore(reply: list[Any]) -> None:
    return None
