"""Running a spawned coroutine: its runner task and ``report_progress``.

The runner is the asyncio task that awaits a spawned coroutine. It tells the actor
when the coroutine starts and, through a done callback, how it ended; the done
callback is the one exit path, so even a runner cancelled before its first step
reports back (and closes the never-started coroutine, which would otherwise warn).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from ._errors import TrackerClosed
from ._messages import Progress, RunnerFinished, RunnerStarted
from ._models import ANY_OWNER, TaskStatus, check_message, check_progress, json_copy
from ._redact import redact_error

__all__ = ["report_progress"]

#: Posts a fire-and-forget message to the actor; raises TrackerClosed once it stopped.
Post = Callable[[object], None]


@dataclass(frozen=True, slots=True)
class _Reporter:
    post: Post
    task_id: str


_current: contextvars.ContextVar[_Reporter] = contextvars.ContextVar("taskd_current_task")


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
    reporter.post(Progress(reporter.task_id, progress, text, ANY_OWNER))


async def _run(post: Post, task_id: str, coro: Coroutine[object, object, object]) -> object:
    post(RunnerStarted(task_id))
    value = await coro
    return value


def start_runner(
    post: Post,
    task_id: str,
    coro: Coroutine[object, object, object],
    context: contextvars.Context,
) -> asyncio.Task[object]:
    """Start the runner task of a spawned coroutine in the caller's context."""
    context.run(_current.set, _Reporter(post, task_id))
    task = asyncio.get_running_loop().create_task(_run(post, task_id, coro), context=context)

    def done(t: asyncio.Task[object]) -> None:
        coro.close()  # no-op once it ran; silences "never awaited" if cancelled early
        # If the actor is gone, shutdown has already recorded this task.
        with contextlib.suppress(TrackerClosed):
            post(_outcome(task_id, t))

    task.add_done_callback(done)
    return task


def _outcome(task_id: str, task: asyncio.Task[object]) -> RunnerFinished:
    if task.cancelled():
        return RunnerFinished(task_id, TaskStatus.CANCELLED, None, None, None, None)
    exc = task.exception()
    if exc is not None:
        return RunnerFinished(task_id, TaskStatus.FAILED, None, None, exc, redact_error(exc))
    value = task.result()
    try:
        result = json_copy(value, "the task's return value")
    except (TypeError, ValueError) as err:
        return RunnerFinished(task_id, TaskStatus.FAILED, None, None, err, redact_error(err))
    return RunnerFinished(task_id, TaskStatus.COMPLETED, value, result, None, None)
