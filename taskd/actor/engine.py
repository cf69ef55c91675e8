"""``Engine``: what holds the records, behind the one actor.

The actor (``taskd.actor``) keeps the mailbox, the batches, the waiters, the runners
of spawned coroutines, the hub of subscriptions, the timers and teardown. An engine
keeps the records and applies the commands that touch them: each handler takes a
message and the caller's reply future and returns the answer, or ``DEFERRED`` when
it answers the future itself once the batch is committed (``commit``). The local
engine answers synchronously from the pure ``TaskState``; the Redis engine queues
one script call per command and sends the batch as one pipeline.

The points where engines differ are the named hooks below (aiohttp's
``BaseRunner._make_server`` is the model: an abstract base with named hooks, not a
concrete class overridden method by method). A new engine (PostgreSQL, Redis
Cluster) implements this class; the actor does not change (docs/architecture.md).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from .._counters import ProcessSeries, TaskCounters
from .._models import JSON, OwnerScope, RawJSON, TaskRecord, TaskStatus
from . import messages as m
from .hub import Hub
from .runner import Runner
from .stats import TrackerStats
from .timers import Kind, Timers

if TYPE_CHECKING:
    from .._tracing import Tracing
    from .._webhooks import WebhookSender

__all__ = ["DEFERRED", "Deferred", "Engine", "Handler", "Host", "Reply", "Settle"]

#: A caller's reply future (None: a fire-and-forget message).
Reply = "asyncio.Future[Any] | None"
#: A command handler: (message, reply future) → the answer, or ``DEFERRED``. The
#: message is typed ``Any``: a registry cannot tie each key's type to its value's.
Handler = Callable[[Any, "asyncio.Future[Any] | None"], object]
#: How a runner's outcome settles its handle: (status, value, exception).
Settle = tuple[TaskStatus, object, "BaseException | None"]


class Deferred:
    """Returned by a handler that answers its caller later (on the future it got)."""


DEFERRED: Final = Deferred()


class Host(Protocol):
    """What an engine may use of the actor that drives it (``Actor`` is one): the
    batch's clock, this process's runners, waiters and subscriptions, and the
    per-batch effects that go out after the commit."""

    #: The batch's clock reading.
    now: float
    closed: bool
    #: Shutting down (``Drain``), and the loop ending after this batch (``Stop``).
    draining: bool
    stopping: bool
    timers: Timers
    hub: Hub
    mailbox: asyncio.Queue[tuple[object, asyncio.Future[Any] | None]]
    runners: dict[str, Runner]
    waiters: dict[str, set[asyncio.Future[Any]]]
    #: Replies that wait for the commit: (future, exception or None, value).
    replies: list[tuple[asyncio.Future[Any], BaseException | None, object]]
    #: Runners to start, and handles to settle, once the batch is committed.
    launch: list[Runner]
    #: The tasks' spans, with OpenTelemetry (``_tracing``).
    tracing: Tracing | None
    settle: list[tuple[Runner, TaskRecord]]

    def post(self, msg: object) -> None:
        """Queue a fire-and-forget message."""

    def dispatch(self, msg: object, fut: asyncio.Future[Any] | None) -> None:
        """Handle one message now (a held one, sent again)."""

    def send_replies(self) -> None:
        """Answer the callers whose replies waited for the commit."""

    def answer(
        self, replies: list[tuple[asyncio.Future[Any], BaseException | None, object]]
    ) -> None:
        """Answer replies the engine kept for a commit of its own (a pipelined one)."""

    def release(self, settle: list[tuple[Runner, TaskRecord]], launch: list[Runner]) -> None:
        """Settle handles and start runners the engine kept for a commit of its own."""

    def wake_waiters(self, rec: TaskRecord) -> None:
        """Answer everyone waiting for this terminal record."""

    def wait_on(
        self, msg: m.Wait, fut: asyncio.Future[Any] | None, rec: TaskRecord
    ) -> tuple[TaskRecord | None, bool] | Deferred:
        """Answer a wait now or park it."""

    def add_runner(self, msg: m.Spawn, rec: TaskRecord) -> TaskRecord:
        """Book the runner of a spawned record."""

    def stats(
        self,
        counts: dict[tuple[str, TaskStatus], int],
        records: int,
        active: int,
        finished: TaskCounters,
        processes: list[ProcessSeries] | None = None,
    ) -> TrackerStats:
        """``Stats``' answer from the engine's counts and task counters (and every
        process's series, this one's first, when the engine has them)."""

    def series(self, process: str | None = None) -> ProcessSeries:
        """The series of this process now."""


class Engine(abc.ABC):
    """The records' keeper, as the actor sees it. See the module docstring."""

    #: Whether replies wait for the batch's commit (a durable store: nothing is
    #: acknowledged that is not written). False: a handler's answer goes out at once.
    replies_after_commit: bool = False
    #: The first event id of this boot (or of the shared space): replays start here.
    boot_seq: int = 0
    #: Whether the event replay is read from the engine (a shared stream), not kept
    #: in this process's ring.
    shared_replay: bool = False
    #: The deployment's page-token key, if the engine keeps one (None: random).
    page_key: bytes | None = None
    #: Why the engine cannot take changes (None while it can); /health reports it.
    store_error: str | None = None

    actor: Host

    def bind(self, actor: Host) -> None:
        """Called once by the actor that drives this engine."""
        self.actor = actor

    @abc.abstractmethod
    def handlers(self) -> Mapping[type[Any], Handler]:
        """The engine's handler for each command that touches records."""

    @abc.abstractmethod
    async def open(self, sender: WebhookSender | None) -> None:
        """Load or connect before the loop starts; ``sender`` delivers webhooks.
        Raises ``StoreError`` when the records cannot be reached."""

    def start(self) -> None:
        """The loop starts (background tasks of the engine go here). Default: none."""
        return None

    async def stop(self) -> None:
        """The loop ended (after teardown): release what ``open`` took. Default: none."""
        return None

    def refuses(self, msg: object, fut: asyncio.Future[Any] | None) -> bool:
        """Called while ``store_error`` is set: answer (or keep) ``msg`` without
        handling it, and say so; False lets it through (reads go on)."""
        return False

    @abc.abstractmethod
    async def commit(self) -> bool:
        """End of a batch: write (or send) it, answer deferred callers
        (``actor.send_replies``). True lets the batch's effects out (settle outcomes,
        start runners); False while what changed is not committed. An engine may
        pipeline its commits (the local one with a durable store): it takes the
        batch's replies and effects, returns while the write is in flight, and lets
        them out itself once it is committed (``Host.answer``, ``Host.release``);
        draining or stopping, it returns once every batch so far is committed."""

    @abc.abstractmethod
    def fire(self, kind: Kind, task_id: str) -> None:
        """An engine deadline came due (heartbeat, cancel grace, retry, sweep)."""

    @abc.abstractmethod
    def fired(self) -> None:
        """Every due timer of this batch has fired (expire records, re-arm)."""

    @abc.abstractmethod
    def latest(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        """Answer a wait that ran out (or a released long-poll) with
        ``(latest record or None, False)``."""

    @abc.abstractmethod
    def timed_out(self, task_id: str) -> None:
        """A spawn's timeout passed: its runner was cancelled; record cancelling."""

    @abc.abstractmethod
    def end(
        self,
        runner: Runner,
        status: TaskStatus,
        *,
        result: JSON | RawJSON = None,
        error: str | None = None,
        settle: Settle,
    ) -> None:
        """Record how a runner of this process ended (``status`` completed, failed or
        cancelled) and settle its handle with ``settle`` once that is committed."""

    def admits(self) -> bool:
        """Whether a spawn without resource_id may skip the reply (the fast path:
        the tracker mints the record itself). Default: never."""
        return False

    def settled(self) -> bool:
        """Whether a read may skip the mailbox now (the read fast path). Default: never."""
        return False

    def read(self, task_id: str, owner: OwnerScope) -> TaskRecord | None:
        """The record as ``Get`` answers it, for the read fast path (``settled``)."""
        raise NotImplementedError

    def peek(self, task_id: str, owner: OwnerScope) -> TaskRecord | Deferred | None:
        """The read fast path in one call: ``read`` when ``settled``, else
        ``DEFERRED`` (only the actor may answer). An engine may fold the two."""
        return self.read(task_id, owner) if self.settled() else DEFERRED

    def mint(self, now: float) -> tuple[str, float]:
        """A new task id and its instant, for the spawn fast path (``admits``)."""
        raise NotImplementedError

    def hint(self, task_id: str) -> str | None:
        """NOT_FOUND's ``details.hint`` for ``task_id``, from the id alone (never from
        whether a record exists, or whose). Default: none — a shared engine holds
        every process's records, so a miss there is a miss everywhere."""
        return None

    def shut(self) -> None:
        """The loop is ending: answer what the engine still holds (before the actor
        fails every pending reply with ``TrackerClosed``). Default: nothing held."""
        return None
