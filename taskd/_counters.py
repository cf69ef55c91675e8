"""What the actor counts for ``/metrics`` and the dashboard: tasks finished by type
and status, how long they ran and waited, and a per-minute series of the last hour.

Counted by the actor as it commits transitions (no scans, no extra messages), read
through the ``Stats`` message. In Redis mode each process counts the transitions it
made itself; Prometheus sums the processes (docs/operations.md).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from ._models import TERMINAL, TaskRecord, TaskStatus

__all__ = ["BUCKETS", "HTTP_BUCKETS", "MAX_TASK_TYPES", "OTHER", "Histogram", "TaskCounters"]

#: Upper bounds (seconds) of the run- and wait-time histogram buckets: from a few
#: milliseconds (a quick in-process job) to an hour (a batch job); +Inf is implied.
BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
#: At most this many distinct ``task_type`` label values per metric family; later
#: types are counted under ``_other`` (a counter cannot move between series without
#: breaking ``rate()``, so the first types seen keep theirs).
MAX_TASK_TYPES: Final = 100
OTHER: Final = "_other"
#: Minutes of the per-minute series kept (the dashboard's chart: the last hour).
MINUTES: Final = 60


#: Upper bounds (seconds) of the HTTP request duration buckets: a GET takes about a
#: millisecond; long-polls (up to 60 s) and event streams land in the top ones.
HTTP_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """Bucket counts (per bucket; the exposition makes them cumulative), their sum
    and count, for one label set."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation (seconds; negative clock steps count as 0)."""
        value = max(value, 0.0)
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ``+Inf`` last."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out

    def copy(self) -> Histogram:
        """A snapshot (the owner keeps counting into the original)."""
        out = Histogram(self.bounds)
        out.buckets = list(self.buckets)
        out.sum, out.count = self.sum, self.count
        return out


class TaskCounters:
    """The counts themselves; only the actor calls the ``on_*`` methods."""

    __slots__ = ("as_of", "finished", "minutes", "run", "wait")

    def __init__(self) -> None:
        #: The tracker's clock when this snapshot was taken (0 for the live counters).
        self.as_of = 0.0
        self.finished: dict[tuple[str, str], int] = {}
        self.run: dict[str, Histogram] = {}
        self.wait: dict[str, Histogram] = {}
        # minute (Unix time // 60) -> [completed, failed, cancelled]
        self.minutes: dict[int, list[int]] = {}

    def on_started(self, rec: TaskRecord) -> None:
        """``rec`` just became ``running``: observe how long it waited."""
        if rec.started_at is not None:
            _label(self.wait, rec.task_type).observe(rec.started_at - rec.created_at)

    def on_finished(self, rec: TaskRecord) -> None:
        """``rec`` just reached a terminal status."""
        status = rec.status
        task_type = rec.task_type
        known = self.finished
        if (
            (task_type, status.value) not in known
            and _types(known) >= MAX_TASK_TYPES
            and not any(t == task_type for t, _ in known)
        ):
            task_type = OTHER
        key = (task_type, status.value)
        known[key] = known.get(key, 0) + 1
        finished = rec.finished_at if rec.finished_at is not None else rec.updated_at
        if rec.started_at is not None:
            _label(self.run, rec.task_type).observe(finished - rec.started_at)
        minute = int(finished // 60)
        row = self.minutes.get(minute)
        if row is None:
            row = self.minutes[minute] = [0, 0, 0]
            if len(self.minutes) > MINUTES + 1:
                for old in [m for m in self.minutes if m < minute - MINUTES]:
                    del self.minutes[old]
        row[_COLUMN[status]] += 1

    def on_change(self, before: TaskStatus | None, rec: TaskRecord) -> None:
        """A committed transition from ``before`` (None: a new record) to ``rec``."""
        status = rec.status
        if status is before:
            return
        if status is TaskStatus.RUNNING:
            self.on_started(rec)
        elif status in TERMINAL:
            self.on_finished(rec)

    def per_minute(self, now: float | None = None) -> list[list[int]]:
        """The last hour, oldest first: ``[minute_start_unix, completed, failed,
        cancelled]`` for each of the 60 minutes up to ``now`` (default: when the
        snapshot was taken, by the tracker's own clock), zeros included."""
        last = int((self.as_of if now is None else now) // 60)
        out: list[list[int]] = []
        for minute in range(last - MINUTES + 1, last + 1):
            row = self.minutes.get(minute, _ZERO)
            out.append([minute * 60, *row])
        return out

    def snapshot(self, now: float) -> TaskCounters:
        """A copy for one ``Stats`` reply, taken at ``now`` (the tracker's clock)."""
        out = TaskCounters()
        out.as_of = now
        out.finished = dict(self.finished)
        out.run = {k: h.copy() for k, h in self.run.items()}
        out.wait = {k: h.copy() for k, h in self.wait.items()}
        out.minutes = {k: list(v) for k, v in self.minutes.items()}
        return out


_COLUMN: Final = {TaskStatus.COMPLETED: 0, TaskStatus.FAILED: 1, TaskStatus.CANCELLED: 2}
_ZERO: Final = (0, 0, 0)


def _types(finished: dict[tuple[str, str], int]) -> int:
    return len({t for t, _ in finished})


def _label(families: dict[str, Histogram], task_type: str) -> Histogram:
    hist = families.get(task_type)
    if hist is None:
        if len(families) >= MAX_TASK_TYPES:
            task_type = OTHER
            hist = families.get(OTHER)
        if hist is None:
            hist = families[task_type] = Histogram()
    return hist
