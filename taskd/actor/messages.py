"""The commands the tracker handle sends to the actor: one dataclass each (frozen but
for the two sent once per spawned task).

A command that is answered derives from ``Request[R]``, ``R`` being the type of its
reply, so ``Tracker._call(msg)`` is typed by the message it sends. Each travels in
the mailbox together with the future its reply goes to (``None`` for
fire-and-forget messages such as runner reports); that pairing — the mailbox
*item* — is private to the handle and the actor, and callers never see the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._models import JSON, OwnerScope, RawJSON, TaskRecord, TaskStatus

if TYPE_CHECKING:
    # Page and TrackerStats name replies in the quoted Request[...] bases below.
    from ..engine.state import Page  # noqa: F401
    from .outcome import Outcome
    from .stats import TrackerStats  # noqa: F401
    from .subscription import Subscription

R = TypeVar("R", covariant=True)


class Request(Generic[R]):
    """A command answered with an ``R`` on its reply future."""

    __slots__ = ()


# --- commands from callers (each answered on its reply future) ---------------------


@dataclass(frozen=True, slots=True)
class Create(Request[TaskRecord]):
    task_type: str
    resource_id: str | None
    metadata: Mapping[str, JSON]
    owner: str | None
    callback_url: str | None
    heartbeat_timeout: float | None
    #: What the record keeps of the trace (``_tracing``), and the task's span.
    traceparent: str | None = None
    span: object = None
    #: The task this one is a child of (docs/trees.md).
    parent_id: str | None = None
    #: ``complete`` waits for the children to end (docs/trees.md).
    await_children: bool = False


# Spawn and RunnerFinished, one of each per spawned task, are not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__, several times the
# cost of a plain one (~2 µs a spawn). Nothing assigns to a message; hashing is kept.
@dataclass(slots=True, unsafe_hash=True)
class Spawn(Request[TaskRecord]):
    coro: Coroutine[Any, Any, Any]
    task_type: str
    resource_id: str | None
    metadata: Mapping[str, JSON]
    owner: str | None
    callback_url: str | None
    timeout: float | None
    #: The caller's context, so the runner sees the caller's context variables.
    context: contextvars.Context
    #: Set to the coroutine's outcome once the terminal record is committed.
    done: Outcome[Any]
    #: The record, when the caller built it (the fast path: nothing to answer; see
    #: ``Actor.admits``), else None and the actor builds it and replies.
    minted: TaskRecord | None = None
    #: What the record keeps of the trace (``_tracing``), and the task's span.
    traceparent: str | None = None
    span: object = None
    #: The task this one is a child of (docs/trees.md).
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Start(Request[TaskRecord]):
    task_id: str
    owner: OwnerScope


@dataclass(frozen=True, slots=True)
class Progress(Request[TaskRecord]):
    task_id: str
    progress: float | None
    message: str | None
    owner: OwnerScope
    #: The task's stage (None: unchanged).
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class Complete(Request[TaskRecord]):
    task_id: str
    result: JSON | RawJSON
    owner: OwnerScope


@dataclass(frozen=True, slots=True)
class Fail(Request[TaskRecord]):
    task_id: str
    error: str
    owner: OwnerScope


@dataclass(frozen=True, slots=True)
class Cancel(Request[tuple[TaskRecord, bool]]):
    """Answered with the record and whether this cancel changed it."""

    task_id: str
    reason: str
    owner: OwnerScope
    #: The worker of an external task acknowledges: cancelled (``CONFIRM_EXTERNAL``).
    confirm: bool = False


@dataclass(frozen=True, slots=True)
class Delete(Request[None]):
    task_id: str
    owner: OwnerScope


@dataclass(frozen=True, slots=True)
class DeleteMany(Request[tuple[int, "str | None"]]):
    """Delete the terminal tasks matching the filters, at most ``limit``, newest
    first from ``before`` (an id: older ones only); answered with the count deleted
    and the cursor to go on from (None: none left)."""

    statuses: frozenset[TaskStatus]
    task_type: str | None
    resource_id: str | None
    owner: OwnerScope
    limit: int
    before: str | None

    def listing(self) -> ListTasks:
        """The listing of the tasks it deletes (each engine finds them as it lists)."""
        return ListTasks(
            self.statuses, self.task_type, self.resource_id, self.owner, self.limit, self.before
        )


@dataclass(frozen=True, slots=True)
class Get(Request["TaskRecord | None"]):
    task_id: str
    owner: OwnerScope


@dataclass(frozen=True, slots=True)
class ListTasks(Request["Page"]):
    statuses: frozenset[TaskStatus] | None
    task_type: str | None
    resource_id: str | None
    owner: OwnerScope
    limit: int
    #: Only ids strictly older than this one (ids sort in creation order).
    before: str | None
    stage: str | None = None
    #: Only the children of this task.
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Wait(Request["tuple[TaskRecord | None, bool]"]):
    """Answered when the task is terminal, or with its latest record at the deadline."""

    task_id: str
    owner: OwnerScope
    timeout: float | None
    #: A long-poll (answered with the latest record at shutdown) rather than a wait
    #: for the outcome (which only the terminal record or closing answers).
    poll: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe(Request["TaskRecord | None"]):
    """Register a subscription; the reply is the task's current record (or None)."""

    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Stats(Request["TrackerStats"]):
    """Counts for metrics: records by status and type, mailbox depth, commands."""


# --- messages from the tracker's own machinery -------------------------------------


@dataclass(slots=True, unsafe_hash=True)  # (not frozen: see Spawn)
class RunnerFinished:
    task_id: str
    #: COMPLETED, FAILED or CANCELLED: what the coroutine did.
    outcome: TaskStatus
    #: The coroutine's return value (COMPLETED) as returned, for the handle.
    value: object
    #: Its JSON copy, stored in the record.
    result: JSON | RawJSON
    #: The exception (FAILED), re-raised to whoever awaits the handle.
    exc: BaseException | None
    #: The redacted error text stored in the record.
    error: str | None


@dataclass(frozen=True, slots=True)
class ReleasePolls(Request[int]):
    """Shutdown step 0: answer every pending long-poll with its latest record now, and
    every later one at once, so that a server need not wait for them to time out."""


@dataclass(frozen=True, slots=True)
class Drain(Request["dict[str, asyncio.Task[None]]"]):
    """Shutdown step 1: stop taking commands; the reply lists the live runners."""


@dataclass(frozen=True, slots=True)
class Abandon(Request[None]):
    """Shutdown step 2: record runners that ignored cancellation as cancelled."""

    task_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Stop(Request[None]):
    """Shutdown step 3: commit, fail what still waits, and leave the loop."""


@dataclass(frozen=True, slots=True)
class Unwait:
    """A waiter gave up (its caller was cancelled): forget its future."""

    task_id: str
    fut: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class Committed:
    """Posted when an engine's pipelined write (``write``) has ended: the actor lets
    out what waited for it (``LocalEngine``, docs/architecture.md)."""

    write: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class Tick:
    """Posted by the loop timer at the earliest deadline: fire due timers."""
