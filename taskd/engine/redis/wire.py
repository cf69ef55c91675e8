"""``Wire``: the actor's own Redis connection, spoken through hiredis directly.

redis-py opens the connection (URL, authentication, TLS, database, RESP2) and keeps
owning it (``conn``: closed through it); the actor then writes each batch as one
buffer of commands packed by ``hiredis.pack_command`` and reads the replies with a
``hiredis.Reader`` of its own. Nothing else uses the connection, and a batch is
written only after the previous one's replies are all read, so every reply read is
the next command's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["READ_TIMEOUT", "Sent", "Unsent", "Wire"]

#: Seconds a batch's replies may take before the batch fails (Redis unreachable).
READ_TIMEOUT: Final = 2.0
# Above this many bytes waiting in the socket's buffer, a write waits for it to drain.
_HIGH_WATER: Final = 1 << 20


class Unsent(Exception):
    """A command of a batch that could not be sent (an argument hiredis cannot
    encode, such as text holding a lone surrogate)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Sent(NamedTuple):
    """What ``Wire.write`` sent: how many commands, and those it could not encode."""

    total: int
    unsent: dict[int, Exception]


class Wire:
    """One connection, one batch at a time: ``roundtrip`` sends and reads."""

    __slots__ = ("_parser", "_reader", "_writer", "conn")

    def __init__(self, conn: AbstractConnection) -> None:
        import hiredis
        from redis.exceptions import ResponseError

        self.conn = conn
        # (redis-py's own attributes: present in every version taskd supports)
        reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
        writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
        if reader is None or writer is None:
            raise ConnectionError("the Redis connection is not open")
        self._reader = reader
        self._writer = writer
        # Error replies become ResponseError objects in the reply list, text intact
        # ("OOM …", "READONLY …", "ERR Function not found").
        self._parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)

    async def roundtrip(self, commands: list[tuple[object, ...]]) -> list[Any]:
        """Send the commands, return a reply each: a value, a ``ResponseError`` for an
        error reply, or ``Unsent`` for a command that could not be encoded (the
        others still go). Raises ``OSError`` (``TimeoutError``, ``ConnectionError``)
        when the connection fails: its state is then unknown."""
        sent = self.write(commands)
        if self._writer.transport.get_write_buffer_size() > _HIGH_WATER:
            await self._writer.drain()
        return await self.read(sent)

    def write(self, commands: list[tuple[object, ...]]) -> Sent:
        """Write the commands (``read`` takes their replies): several connections'
        batches can be in flight at once with no task per connection."""
        from hiredis import pack_command

        unsent: dict[int, Exception] = {}
        try:
            data = b"".join([pack_command(args) for args in commands])  # type: ignore[arg-type]
        except Exception:
            chunks: list[bytes] = []
            for i, args in enumerate(commands):
                try:
                    chunks.append(pack_command(args))  # type: ignore[arg-type]
                except Exception as exc:
                    unsent[i] = exc
            data = b"".join(chunks)
        if len(unsent) < len(commands):
            self._writer.write(data)
        return Sent(len(commands), unsent)

    async def read(self, sent: Sent) -> list[Any]:
        """The replies of what ``write`` sent, in order (see ``roundtrip``)."""
        unsent = sent.unsent
        expected = sent.total - len(unsent)
        got: list[Any] = []
        parser = self._parser
        async with asyncio.timeout(READ_TIMEOUT):
            while len(got) < expected:
                reply = parser.gets()
                if reply is False:
                    chunk = await self._reader.read(1 << 16)
                    if not chunk:
                        raise ConnectionError("Redis closed the connection")
                    parser.feed(chunk)
                    continue
                got.append(reply)
        if not unsent:
            return got
        replies = iter(got)
        return [Unsent(unsent[i]) if i in unsent else next(replies) for i in range(sent.total)]

    # --- a subscribed connection: commands go out, pushes come in ---------------------

    def send(self, *command: object) -> None:
        """Write one command without reading its reply (a subscribed connection's
        confirmations arrive among its messages, read by ``pushes``)."""
        from hiredis import pack_command

        self._writer.write(pack_command(command))  # type: ignore[arg-type]

    async def pushes(self) -> list[Any]:
        """What arrived: at least one reply or push, and every other one already read
        (waits for the first). Raises ``ConnectionError`` when the connection ends."""
        parser = self._parser
        got: list[Any] = []
        while True:
            reply = parser.gets()
            if reply is not False:
                got.append(reply)
                continue
            if got:
                return got
            chunk = await self._reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            parser.feed(chunk)
