"""Running a spawned coroutine: its runner task and ``report_progress``.

The runner is the asyncio task that awaits a spawned coroutine (its record is
``running`` from creation). It reports how the coroutine ended itself, from the
runner's body; a done callback covers the one case the body cannot, a runner
cancelled before its first step: it closes the never-started coroutine (which would
otherwise warn "never awaited") and reports the cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .._args import check_stage
from .._checks import check_progress, store_json
from .._errors import TrackerClosed
from .._models import ANY_OWNER, TaskStatus
from .._redact import redact_error, redact_message
from .messages import Progress, RunnerFinished
from .outcome import Outcome

__all__ = ["ContextExecutor", "Runner", "current_parent", "report_progress"]

#: Posts a fire-and-forget message to the actor; raises TrackerClosed once it stopped.
Post = Callable[[object], None]
T = TypeVar("T")


# (post, task_id, loop) of the spawned task whose runner this context belongs to.
# Not the runner itself: the runner holds its task, which holds this context (a cycle
# only the cyclic collector would free).
_current: contextvars.ContextVar[tuple[Post, str, asyncio.AbstractEventLoop, str | None]] = (
    contextvars.ContextVar("taskd_current_task")
)


def current_parent(post: Post, owner: str | None) -> str | None:
    """The id of the spawned task this code runs in, if its tracker posts with
    ``post`` and it belongs to ``owner``: a task spawned here is its child by default
    (docs/trees.md)."""
    here = _current.get(None)
    if here is None or here[0] != post or here[3] != owner:
        return None
    return here[1]


def report_progress(
    fraction: float | None, message: str | None = None, *, stage: str | None = None
) -> None:
    """Update the progress of the spawned task this code runs in.

    A plain function: it queues the update for the tracker and returns at once.
    ``fraction`` is 0.0–1.0 (or None to change only the message, which is redacted
    like an error, or the ``stage``: a short machine-readable name). Thread-safe: it
    may be called from a thread the task started (``asyncio.to_thread``,
    ``loop.run_in_executor``: see ``ContextExecutor``), and then hands the update to
    the task's event loop. Raises ``RuntimeError`` outside a
    task started by ``Tracker.spawn`` and ``TrackerClosed`` once its tracker has
    stopped.
    """
    progress = check_progress(fraction)
    text = redact_message(message)
    stage = check_stage(stage)
    reporter = _current.get(None)
    if reporter is None:
        raise RuntimeError("report_progress() must be called inside a task started by spawn()")
    post, task_id, loop, _ = reporter
    msg = Progress(task_id, progress, text, ANY_OWNER, stage)
    if _running_loop() is loop:
        post(msg)
        return
    # Another thread: the mailbox is the loop's alone (asyncio.Queue is not
    # thread-safe), so the loop posts it.
    try:
        loop.call_soon_threadsafe(_post_quietly, post, msg)
    except RuntimeError:  # the loop is closed
        raise TrackerClosed("the tracker's event loop is closed") from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _post_quietly(post: Post, msg: object) -> None:
    # (run by the loop for a thread: the tracker may have stopped meanwhile, and
    # a progress update for a stopped tracker is dropped, as its task was ended)
    with contextlib.suppress(TrackerClosed):
        post(msg)


class ContextExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose jobs run in the context of the code that submitted them,
    as ``asyncio.to_thread``'s do: ``loop.run_in_executor(None, fn)`` from a spawned
    task then runs ``fn`` where ``report_progress`` knows its task. A tracker makes
    one its loop's default executor when the loop has none (``install``)."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in a copy of the submitter's context."""
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> None:
        """Make one the loop's default executor, if the loop has none yet (one set
        by the application is left alone)."""
        if getattr(loop, "_default_executor", False) is None:
            loop.set_default_executor(cls(thread_name_prefix="asyncio"))


class Runner:
    """One spawned coroutine: the actor's bookkeeping of it, and its task's done
    callback, which reports how the coroutine ended.

    The coroutine is the task's own (no wrapping coroutine), and one object per
    spawn holds what a closure and its cells would: fan-outs keep thousands alive
    at once, and every object they hold lengthens the cyclic collector's walks.
    A task cancelled before its first step needs no special case: asyncio throws
    the cancellation into the coroutine, which closes it without a "never awaited"
    warning.
    """

    __slots__ = (
        "context",
        "coro",
        "outcome",
        "owner",
        "post",
        "settle_with",
        "task",
        "task_id",
        "timed_out",
        "timeout",
    )

    def __init__(
        self,
        post: Post,
        task_id: str,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context,
        outcome: Outcome[Any],
        timeout: float | None,
        owner: str | None = None,
    ) -> None:
        self.post = post
        self.owner = owner
        self.task_id = task_id
        self.coro: Coroutine[Any, Any, Any] | None = coro
        self.context: contextvars.Context | None = context
        self.outcome = outcome
        self.timeout = timeout
        self.task: asyncio.Task[Any] | None = None
        self.timed_out = False
        #: How to settle ``outcome`` once the record is terminal: (status, value, exc).
        self.settle_with: tuple[TaskStatus, object, BaseException | None] | None = None

    def start(self) -> None:
        """Start the coroutine's task in the caller's context."""
        context, coro = self.context, self.coro
        assert context is not None and coro is not None  # (not started twice)
        self.coro = self.context = None
        loop = asyncio.get_running_loop()
        context.run(_current.set, (self.post, self.task_id, loop, self.owner))
        self.task = task = loop.create_task(coro, context=context)
        # In the task's own context: no copy of the actor's context per task.
        task.add_done_callback(self, context=context)

    def close(self) -> None:
        """Never started (cancelled in its spawn's batch, or refused): close the
        coroutine, which would otherwise warn "never awaited"."""
        if self.coro is not None:
            self.coro.close()
            self.coro = self.context = None

    def __call__(self, task: asyncio.Task[Any]) -> None:
        """The task is done: tell the actor how (unless the actor is gone, in which
        case shutdown has already recorded this task)."""
        task_id = self.task_id
        if task.cancelled():
            end = RunnerFinished(task_id, TaskStatus.CANCELLED, None, None, None, None)
        else:
            exc = task.exception()
            if exc is not None:
                end = RunnerFinished(task_id, TaskStatus.FAILED, None, None, exc, redact_error(exc))
            else:
                value = task.result()
                try:
                    result = store_json(value, "the task's return value")
                except (TypeError, ValueError) as err:
                    end = RunnerFinished(
                        task_id, TaskStatus.FAILED, None, None, err, redact_error(err)
                    )
                else:
                    end = RunnerFinished(task_id, TaskStatus.COMPLETED, value, result, None, None)
        # (not contextlib.suppress: three calls less, once per task)
        try:
            self.post(end)
        except TrackerClosed:
            return  # the actor is gone: shutdown recorded this task
