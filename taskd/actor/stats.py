"""``TrackerStats``: what ``Tracker.stats()`` reports, assembled by the actor from
the engine's counts and its own (mailbox, runners, subscriptions, waiters)."""

from __future__ import annotations

from typing import TypedDict

from .._counters import ProcessSeries, TaskCounters
from .._models import TaskStatus

__all__ = ["TrackerStats"]


class TrackerStats(TypedDict, total=False):
    """What ``Tracker.stats()`` reports (the webhook counters only with webhooks)."""

    #: Records held, by (task_type, status).
    counts: dict[tuple[str, TaskStatus], int]
    records: int
    active: int
    mailbox_depth: int
    commands: int
    runners: int
    subscriptions: int
    waiters: int
    webhooks_delivered: int
    webhooks_failed: int
    #: Tasks finished, run and wait times, and the last hour per minute: counted in
    #: this process (memory, SQLite), or the deployment's totals (Redis), as
    #: docs/operations.md says.
    finished: TaskCounters
    #: Per-process series: this process's own (first) and, with Redis, every other
    #: live process's as it last published them; ``mailbox_depth`` … ``waiters`` and
    #: the webhook counts above are this process's.
    processes: list[ProcessSeries]
