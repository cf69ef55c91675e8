"""Running a spawned coroutine: its runner task and ``report_progress``.

The runner is the asyncio task that awaits a spawned coroutine (its record is
``running`` from creation). It reports how the coroutine ended itself, from the
runner's body; a done callback covers the one case the body cannot, a runner
cancelled before its first step: it closes the never-started coroutine (which would
otherwise warn "never awaited") and reports the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

from ._errors import TrackerClosed
from ._messages import Progress, RunnerFinished
from ._models import ANY_OWNER, TaskStatus, check_message, check_progress, store_json
from ._redact import redact_error

__all__ = ["Outcome", "report_progress"]

#: Posts a fire-and-forget message to the actor; raises TrackerClosed once it stopped.
Post = Callable[[object], None]
T = TypeVar("T")


# (post, task_id) of the spawned task whose runner this context belongs to.
_current: contextvars.ContextVar[tuple[Post, str]] = contextvars.ContextVar("taskd_current_task")


def report_progress(fraction: float | None, message: str | None = None) -> None:
    """Update the progress of the spawned task this code runs in.

    A plain function: it queues the update for the tracker and returns at once.
    ``fraction`` is 0.0–1.0 (or None to change only the message). Raises
    ``RuntimeError`` outside a task started by ``Tracker.spawn`` and
    ``TrackerClosed`` once its tracker has stopped.
    """
    progress = check_progress(fraction)
    text = check_message(message)
    reporter = _current.get(None)
    if reporter is None:
        raise RuntimeError("report_progress() must be called inside a task started by spawn()")
    post, task_id = reporter
    post(Progress(task_id, progress, text, ANY_OWNER))


class Outcome(Generic[T]):
    """How a spawned coroutine ended: set once by the actor, awaited by anyone.

    Each awaiter waits on a future of its own, so cancelling one awaiter never
    cancels the outcome for the others, and the actor wakes awaiters directly
    (no extra event-loop hop through ``asyncio.shield``).
    """

    __slots__ = ("_exc", "_status", "_value", "_waiters")

    def __init__(self) -> None:
        self._status: TaskStatus | None = None
        self._value: T | None = None
        self._exc: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def done(self) -> bool:
        """Whether the outcome is known."""
        return self._status is not None

    def set(self, status: TaskStatus, value: Any, exc: BaseException | None) -> None:
        """Record the outcome (actor only, after the terminal record is committed)."""
        if self._status is not None:
            return
        self._status, self._value, self._exc = status, value, exc
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def __await__(self) -> Generator[Any, None, T]:
        if self._status is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                yield from waiter
            finally:
                if not waiter.done() and waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._status is TaskStatus.COMPLETED:
            return cast(T, self._value)
        if self._exc is not None:
            raise self._exc
        raise asyncio.CancelledError()


async def _run(post: Post, task_id: str, coro: Coroutine[Any, Any, Any], ended: list[bool]) -> None:
    try:
        value = await coro
    except asyncio.CancelledError:
        ended.append(True)
        post(RunnerFinished(task_id, TaskStatus.CANCELLED, None, None, None, None))
        raise
    except BaseException as exc:
        ended.append(True)
        post(RunnerFinished(task_id, TaskStatus.FAILED, None, None, exc, redact_error(exc)))
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: recorded, and still propagated
        return
    ended.append(True)
    try:
        result = store_json(value, "the task's return value")
    except (TypeError, ValueError) as err:
        post(RunnerFinished(task_id, TaskStatus.FAILED, None, None, err, redact_error(err)))
    else:
        post(RunnerFinished(task_id, TaskStatus.COMPLETED, value, result, None, None))


def start_runner(
    post: Post,
    task_id: str,
    coro: Coroutine[Any, Any, Any],
    context: contextvars.Context,
) -> asyncio.Task[None]:
    """Start the runner task of a spawned coroutine in the caller's context.

    The runner reports its own end (no extra hop through a done callback); the done
    callback only covers a runner cancelled before its first step, whose body never
    ran: it closes the coroutine (which would otherwise warn "never awaited") and
    reports the cancellation.
    """
    context.run(_current.set, (post, task_id))
    ended: list[bool] = []
    task = asyncio.get_running_loop().create_task(_run(post, task_id, coro, ended), context=context)

    def done(t: asyncio.Task[None]) -> None:
        if not ended:
            coro.close()
            # If the actor is gone, shutdown has already recorded this task.
            with contextlib.suppress(TrackerClosed):
                post(RunnerFinished(task_id, TaskStatus.CANCELLED, None, None, None, None))

    task.add_done_callback(done)
    return task
