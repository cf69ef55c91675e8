"""What ``/metrics`` and the dashboard count: tasks finished by type and status, how
long they ran and waited, and a per-minute series of the last hour (``TaskCounters``);
and each process's own series (``ProcessSeries``: its HTTP requests, mailbox,
subscriptions, waiters, commands and webhooks).

The local engine counts tasks in process as it commits transitions (no scans, no extra
messages). With Redis the counts are the deployment's totals, kept in Redis by the
same calls that move tasks (``engine/redis/tally.lua``) and read into a
``TaskCounters`` of the same shape; each process publishes its ``ProcessSeries`` and
shows every live process's (docs/operations.md).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ._models import TaskRecord, TaskStatus

__all__ = [
    "BUCKETS",
    "HTTP_BUCKETS",
    "MAX_TASK_TYPES",
    "MINUTES",
    "OTHER",
    "Histogram",
    "HttpCounters",
    "ProcessSeries",
    "TaskCounters",
]

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
        if value < 0.0:  # (not max(): one call less per observation, same value)
            value = 0.0
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

    @classmethod
    def of(cls, buckets: list[int], total: float, bounds: tuple[float, ...]) -> Histogram:
        """A histogram from its per-bucket counts (``+Inf`` last) and sum, as another
        process or Redis kept them; ``ValueError`` if they do not fit ``bounds``."""
        if len(buckets) != len(bounds) + 1:
            raise ValueError(f"{len(buckets)} buckets for {len(bounds)} bounds")
        out = cls(bounds)
        out.buckets = [int(n) for n in buckets]
        out.sum, out.count = float(total), sum(out.buckets)
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
            hist = self.wait.get(rec.task_type)  # (the common case: no _label call)
            if hist is None:
                hist = _label(self.wait, rec.task_type)
            hist.observe(rec.started_at - rec.created_at)

    def on_spawned(self, task_type: str) -> None:
        """A spawned task: ``running`` from its creation, so it waited 0 s (what
        ``on_started`` observes, without reading the record)."""
        hist = self.wait.get(task_type)
        if hist is None:
            hist = _label(self.wait, task_type)
        hist.observe(0.0)

    def on_finished(self, rec: TaskRecord) -> None:
        """``rec`` just reached a terminal status."""
        status = rec.status
        task_type = rec.task_type
        known = self.finished
        key = (task_type, _VALUE[status])  # (no enum ``.value`` property calls)
        if (
            key not in known
            and _types(known) >= MAX_TASK_TYPES
            and not any(t == task_type for t, _ in known)
        ):
            key = (OTHER, key[1])
        known[key] = known.get(key, 0) + 1
        finished = rec.finished_at if rec.finished_at is not None else rec.updated_at
        started = rec.started_at
        if started is not None:
            hist = self.run.get(task_type)
            if hist is None:
                hist = _label(self.run, task_type)
            hist.observe(finished - started)
        minute = int(finished // 60)
        row = self.minutes.get(minute)
        if row is None:
            row = self.minutes[minute] = [0, 0, 0]
            if len(self.minutes) > MINUTES + 1:
                for old in [m for m in self.minutes if m < minute - MINUTES]:
                    del self.minutes[old]
        row[_COLUMN[status]] += 1

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

    def types(self) -> set[str]:
        """The task types with series of their own (``_other`` aside)."""
        out = {t for t, _ in self.finished} | set(self.run) | set(self.wait)
        out.discard(OTHER)
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
_VALUE: Final = {s: s.value for s in TaskStatus}
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


class HttpCounters:
    """HTTP requests served, by (method, route, status code), and their durations, by
    (method, route): counted by ``taskd serve``'s middleware (``taskd.web``), one per
    tracker, read into this process's ``ProcessSeries``."""

    __slots__ = ("counts", "durations")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}


@dataclass(frozen=True, slots=True)
class ProcessSeries:
    """One process's own series at one instant: what its actor, its web layer and its
    webhook sender counted. Without Redis, the one process's, exported without a
    label; with Redis, each process publishes its own (``to_json``) and every
    process's ``/metrics`` shows all live ones, labelled ``process``."""

    #: The process's name in the task space (``host:pid:random``); None for the
    #: only process of an in-process tracker (exported without a ``process`` label).
    process: str | None
    mailbox_depth: int
    subscriptions: int
    waiters: int
    commands: int
    #: (delivered, failed), or None without webhooks.
    webhooks: tuple[int, int] | None
    #: Snapshots (copies), never the live counters.
    http: Mapping[tuple[str, str, int], int]
    durations: Mapping[tuple[str, str], Histogram]
    #: How late (seconds) the event loop ran the actor's last timer.
    loop_lag: float = 0.0

    def to_json(self) -> str:
        """A compact JSON text of these series (what a process publishes)."""
        return json.dumps(
            {
                "p": self.process,
                "g": [self.mailbox_depth, self.subscriptions, self.waiters],
                "c": self.commands,
                "w": None if self.webhooks is None else list(self.webhooks),
                "h": [[m, r, code, n] for (m, r, code), n in self.http.items()],
                "d": [[m, r, h.buckets, h.sum] for (m, r), h in self.durations.items()],
                "l": round(self.loop_lag, 6),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ProcessSeries | None:
        """The series another process published, or None if the text is not such a
        record (a process of another version, say: it is left out, not fatal)."""
        try:
            d = json.loads(text)
            process = d["p"]
            if not isinstance(process, str):
                return None
            mailbox, subscriptions, waiters = (int(v) for v in d["g"])
            hooks = d["w"]
            return cls(
                process,
                mailbox,
                subscriptions,
                waiters,
                int(d["c"]),
                None if hooks is None else (int(hooks[0]), int(hooks[1])),
                {(str(m), str(r), int(code)): int(n) for m, r, code, n in d["h"]},
                {
                    (str(m), str(r)): Histogram.of(buckets, total, HTTP_BUCKETS)
                    for m, r, buckets, total in d["d"]
                },
                float(d.get("l", 0.0)),  # (a process of an earlier version has none)
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return None
