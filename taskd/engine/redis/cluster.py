"""``Nodes``: a Redis Cluster's slot map, and the actor's batches routed over it.

The map comes from ``CLUSTER SLOTS``, asked of any node that answers (the URL's
first, then every master known). Each command goes to the master of its key's slot;
a batch becomes one pipeline per master, sent together, each on the actor's own
connection to that master (a ``Wire``, as on a single Redis). Clients (redis-py,
for the connection set-up and the background tasks) are made per node from the
URL given, with only the host and port changed, so the password, TLS and options
apply to every node.

What a cluster adds to a batch:

- **Redirections.** A ``MOVED`` or ``ASK`` reply (a slot moved, a failover) marks the
  map stale; the commands it refused did nothing, and go again once, after the map
  is read again (``ASK``: to the node named, after ``ASKING``).
- **A master that fails.** Its commands get ``Down`` replies (503 to their callers,
  runner reports kept and sent again); the other masters' commands are answered.
  The map is read again before the next batch: once a replica is promoted, its
  slots are served again, with no restart.
- **Acknowledged means replicated.** Redis replicates asynchronously: a write a
  master acknowledged and then lost with it is gone. On a master with replicas, a
  batch that writes ends with ``WAIT 1`` (``WAIT_MS``): its writes are acknowledged
  only once a replica has them; if none confirms in time, their callers get 503.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from ..._errors import StoreError
from .wire import Sent, Wire

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["WAIT_MS", "Down", "Nodes"]

log = logging.getLogger("taskd")

#: Milliseconds a batch's writes wait for a replica to confirm them.
WAIT_MS: Final = 1000
#: Seconds the slot map is trusted before it is read again anyway; while a master
#: has no replica, the replicas are counted again this often.
REFRESH: Final = 10.0
REFRESH_UNREPLICATED: Final = 1.0


class Down(StoreError):
    """The reply of a command whose master could not be reached, or whose writes no
    replica confirmed (its caller gets 503)."""


def _redirect(reply: object) -> tuple[str, str] | None:
    """("MOVED" or "ASK", "host:port") for a redirection error reply, else None."""
    if isinstance(reply, Exception):
        parts = str(reply).split()
        if len(parts) == 3 and parts[0] in ("MOVED", "ASK"):
            return parts[0], parts[2]
    return None


class Nodes:
    """The slot map, a redis-py client per node, and a ``Wire`` per master."""

    def __init__(
        self, url: str, client: Callable[[str, float | None], redis.asyncio.Redis]
    ) -> None:
        self._url = url
        self._make = client
        seed = urlsplit(url)
        self._seed = f"{seed.hostname}:{seed.port or 6379}"
        self._clients: dict[tuple[str, float | None], redis.asyncio.Redis] = {}
        # The map: the first slot of each range, sorted, and its master.
        self._starts: list[int] = []
        self._masters: list[str] = []
        #: Replicas per master, as the map says.
        self.replicas: dict[str, int] = {}
        self._wires: dict[str, Wire] = {}
        self._lock = asyncio.Lock()
        self.stale = True
        self._read_at = 0.0

    # --- the map -------------------------------------------------------------------------

    def client(self, addr: str, timeout: float | None) -> redis.asyncio.Redis:
        """The redis-py client of one node (``host:port``), for ``timeout``."""
        client = self._clients.get((addr, timeout))
        if client is None:
            parts = urlsplit(self._url)
            auth, _, _ = parts.netloc.rpartition("@")
            netloc = f"{auth}@{addr}" if auth else addr
            url = urlunsplit(parts._replace(netloc=netloc))
            client = self._clients[(addr, timeout)] = self._make(url, timeout)
        return client

    async def ensure(self) -> None:
        """Read the map if it is stale, or older than ``REFRESH`` (replicas added or
        promoted meanwhile), one reader at a time."""
        now = asyncio.get_running_loop().time()
        # (sooner while a master has no replica: one may be attaching)
        every = REFRESH if all(self.replicas.values()) else REFRESH_UNREPLICATED
        if self.stale or now >= self._read_at + every:
            async with self._lock:
                if self.stale or now >= self._read_at + every:
                    await self._refresh()
                    self._read_at = now

    async def _refresh(self) -> None:
        from redis.exceptions import RedisError

        tried: list[str] = []
        last: Exception | None = None
        for addr in dict.fromkeys([self._seed, *self._masters]):
            tried.append(addr)
            try:
                reply: Any = await self.client(addr, 2.0).execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER", "SLOTS"
                )
            except (RedisError, OSError) as exc:
                last = exc
                continue
            ranges = sorted(
                (
                    int(r[0]),
                    int(r[1]),
                    f"{r[2][0] or addr.rpartition(':')[0]}:{r[2][1]}",
                    len(r) - 3,
                )
                for r in reply
            )
            if not ranges:
                last = StoreError("the cluster serves no slot yet")
                continue
            self._starts = [r[0] for r in ranges]
            self._masters = [r[2] for r in ranges]
            # Replicas as each master sees them (ROLE: those connected to it now); the
            # map's lists lag behind while the cluster's gossip spreads.
            self.replicas = {m: await self._replicas(m) for m in self.masters()}
            self.stale = False
            return
        raise StoreError(f"no Redis Cluster node answers ({', '.join(tried)}): {last}")

    async def _replicas(self, addr: str) -> int:
        from redis.exceptions import RedisError

        try:
            role: Any = await self.client(addr, 2.0).execute_command("ROLE")  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            return 0
        return len(role[2]) if isinstance(role, list) and len(role) > 2 else 0

    def masters(self) -> list[str]:
        """Every master in the map."""
        return list(dict.fromkeys(self._masters))

    def addr_of(self, key: str) -> str:
        """The master of a key's slot."""
        from redis.crc import key_slot

        i = bisect.bisect_right(self._starts, key_slot(key.encode())) - 1
        return self._masters[max(i, 0)]

    # --- batches -------------------------------------------------------------------------

    async def roundtrip(
        self, packed: Sequence[tuple[object, ...]], routes: Sequence[str], writes: Sequence[bool]
    ) -> list[Any]:
        """Send each command to the master of its ``routes`` key; a reply each (a
        ``Down`` where its master failed). ``writes`` says which commands write."""
        await self.ensure()
        replies: list[Any] = [None] * len(packed)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(routes):
            groups.setdefault(self.addr_of(key), []).append(i)
        await self._send(groups, packed, writes, replies)
        moved = [i for i, r in enumerate(replies) if _redirect(r) is not None]
        if moved:
            # Slots moved (a failover, a resharding): those commands did nothing.
            self.stale = True
            redirects = [_redirect(replies[i]) for i in moved]
            await self.ensure()
            asks: dict[str, list[int]] = {}
            again: dict[str, list[int]] = {}
            for i, where in zip(moved, redirects, strict=True):
                assert where is not None
                if where[0] == "ASK":
                    asks.setdefault(where[1], []).append(i)
                else:
                    again.setdefault(self.addr_of(routes[i]), []).append(i)
            await self._send(again, packed, writes, replies)
            await self._send(asks, packed, writes, replies, asking=True)
        return replies

    async def _send(
        self,
        groups: dict[str, list[int]],
        packed: Sequence[tuple[object, ...]],
        writes: Sequence[bool],
        replies: list[Any],
        *,
        asking: bool = False,
    ) -> None:
        """Each master's commands written, then each one's replies read: all the
        masters work at once, and no task is made per master."""
        from redis.exceptions import RedisError

        flight: list[tuple[str, list[int], Wire, Sent, bool]] = []
        for addr, idx in groups.items():
            commands: list[tuple[object, ...]] = []
            for i in idx:
                if asking:
                    commands.append(("ASKING",))
                commands.append(packed[i])
            wait = any(writes[i] for i in idx) and self.replicas.get(addr, 0) > 0
            if wait:
                commands.append(("WAIT", "1", str(WAIT_MS)))
            try:
                wire = self._wires.get(addr)
                if wire is None:
                    pool = self.client(addr, 2.0).connection_pool
                    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                    wire = self._wires[addr] = Wire(conn)
                flight.append((addr, idx, wire, wire.write(commands), wait))
            except (RedisError, OSError) as exc:
                await self._down(addr, idx, replies, exc)
        for addr, idx, wire, sent, wait in flight:
            try:
                got = await wire.read(sent)
            except (RedisError, OSError) as exc:
                await self._down(addr, idx, replies, exc)
                continue
            if asking:
                got = got[1::2] if not wait else [*got[1:-1:2], got[-1]]
            if wait:
                acked = got.pop()
                if not isinstance(acked, int) or acked < 1:
                    down = Down(
                        f"the shared store (Redis Cluster node {addr}): no replica confirmed "
                        f"a write within {WAIT_MS} ms"
                    )
                    got = [down if writes[i] else r for i, r in zip(idx, got, strict=True)]
            for i, reply in zip(idx, got, strict=True):
                if isinstance(reply, Exception) and str(reply).startswith(
                    ("CLUSTERDOWN", "TRYAGAIN")
                ):
                    self.stale = True
                replies[i] = reply

    async def _down(self, addr: str, idx: list[int], replies: list[Any], exc: Exception) -> None:
        await self.drop(addr)
        self.stale = True
        down = Down(f"the shared store (Redis Cluster node {addr}) cannot be reached: {exc}")
        for i in idx:
            replies[i] = down

    async def drop(self, addr: str | None = None) -> None:
        """Close the actor's connection to one master (every one: None)."""
        for a in [addr] if addr is not None else list(self._wires):
            wire = self._wires.pop(a, None)
            if wire is not None:
                await wire.conn.disconnect()
                await self.client(a, 2.0).connection_pool.release(wire.conn)

    async def aclose(self) -> None:
        """Close every connection and client."""
        await self.drop()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
