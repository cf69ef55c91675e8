"""Simulated jobs for ``taskd serve --demo``: a steady stream with progress, messages,
realistic (redacted) failures and the odd cancellation, so a newcomer sees the API and
the dashboard alive at once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any, Final

from ._errors import TaskConflict, TaskdError
from ._models import JSON
from .actor.runner import report_progress
from .handle import TaskHandle
from .tracker import Tracker

__all__ = ["run_demo"]

_KINDS: Final = {
    "session_commit": ["loading messages", "extracting memories", "writing index"],
    "reindex": ["scanning documents", "embedding", "building index", "swapping"],
    "thumbnail.render": ["downloading", "resizing", "uploading"],
    "email.send": ["rendering template", "sending"],
}

# What real failures look like, secrets included: the stored errors show them redacted.
_FAILURES: Final[list[Callable[[], Exception]]] = [
    lambda: ConnectionError(
        "could not connect to postgres://app:hunter2@db.internal:5432/main: connection refused"
    ),
    lambda: TimeoutError(
        "upstream timed out after 30s (Authorization: Bearer sk-abcDEF1234567890xyzXYZ)"
    ),
    lambda: PermissionError("s3 access denied for key AKIAIOSFODNN7EXAMPLE on bucket media"),
    lambda: ValueError("template 'welcome' missing variable 'first_name'"),
    lambda: RuntimeError("vector store returned 503; api_key=vs-live-4f9a8b7c6d retry later"),
]


async def _job(kind: str, rng: random.Random) -> dict[str, JSON]:
    stages = _KINDS[kind]
    for i, stage in enumerate(stages):
        steps = rng.randint(2, 4)
        for step in range(steps):
            report_progress((i + step / steps) / len(stages), stage)
            await asyncio.sleep(rng.uniform(0.1, 0.5))
    if rng.random() < 0.2:
        raise rng.choice(_FAILURES)()
    return {"kind": kind, "items": rng.randint(1, 500), "ms": rng.randint(200, 9000)}


async def run_demo(tracker: Tracker, *, interval: float = 0.8, seed: int | None = None) -> None:
    """Spawn simulated jobs until cancelled; every so often cancel a running one."""
    rng = random.Random(seed)
    running: list[TaskHandle[Any]] = []
    n = 0
    while True:
        n += 1
        kind = rng.choice(list(_KINDS))
        try:
            handle = await tracker.spawn(
                _job(kind, rng),
                task_type=kind,
                resource_id=f"{kind.split('.')[0]}-{rng.randint(1, 40)}",
                metadata={"demo": True},
            )
            running.append(handle)
        except TaskConflict:
            pass  # that resource is busy: exactly what dedup is for
        running = [h for h in running if not h.done()]
        if n % 6 == 0 and running:
            victim = rng.choice(running)
            with contextlib.suppress(TaskdError):  # it may have finished meanwhile
                await victim.cancel(reason="cancelled by the demo")
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
