"""Reading the deployment's metrics from Redis, for ``Stats``: the task counters
``tally.lua`` keeps (written by the calls that move tasks), the records' counts, and
every live process's own series, which each process publishes (``publish``).

One ``Stats`` is two pipelined reads on the actor's connection: this process's series
written first, then one ``MULTI … EXEC`` of plain reads (``reads``: a consistent
snapshot, no script), then, once the processes' names are in, one ``MGET`` of the
others' series (``others``). Writing its own series before reading is what keeps a
process's counters from going backwards between scrapes answered by different
processes: whatever any process shows of it later is at least what it showed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..._counters import BUCKETS, MINUTES, Histogram, ProcessSeries, TaskCounters
from ..._errors import StoreError
from ..._models import TaskStatus
from ...actor.engine import Deferred, Host
from ...actor.stats import TrackerStats
from . import keys
from .background import LIVENESS_MS
from .space import Command, RedisSpace

__all__ = ["StatsRead", "Totals", "others", "publish", "reads", "series"]

#: The per-minute row's column of each terminal status (``TaskCounters.minutes``).
_COLUMN: Final = {"completed": 0, "failed": 1, "cancelled": 2}


def publish(space: RedisSpace, mine: ProcessSeries) -> Command:
    """Write this process's series; they live as long as its liveness key (a process
    that stops renewing them drops out of every scrape with it)."""
    assert mine.process is not None
    key = space.key(keys.SERIES + mine.process)
    return ("SET", (key, mine.to_json(), "PX", str(LIVENESS_MS)))


def reads(space: RedisSpace, now: float, base: str | None = None) -> list[Command]:
    """The deployment's counts as one transaction (answered by ``EXEC``): records by
    (type, status), records, active tasks, tasks finished, the run and wait
    histograms, the hours that hold the last ``MINUTES`` minutes up to ``now``, and
    the processes of the space; of one shard (``base``) on a cluster."""
    last = int(now // 60)
    hours = sorted({(last - MINUTES + 1) // 60, last // 60})

    def k(suffix: str) -> str:
        return space.key(suffix, base)

    return [
        ("MULTI", ()),
        ("HGETALL", (k(keys.COUNTS),)),
        ("ZCARD", (k(keys.ALL),)),
        ("GET", (k(keys.ACTIVE),)),
        ("HGETALL", (k(keys.FINISHED),)),
        ("HGETALL", (k(keys.RUN_SECONDS),)),
        ("HGETALL", (k(keys.WAIT_SECONDS),)),
        *(("HGETALL", (k(f"{keys.PER_MINUTE}{hour}"),)) for hour in hours),
        ("SMEMBERS", (k(keys.PROCS),)),
        ("EXEC", ()),
    ]


@dataclass(slots=True)
class Totals:
    """What ``reads`` found."""

    counts: dict[tuple[str, TaskStatus], int]
    records: int
    active: int
    counters: TaskCounters
    #: The processes of the space (``procs``: announced, not yet found lost).
    procs: list[str]

    @classmethod
    def decode(cls, reply: Sequence[Any], now: float) -> Totals:
        """``EXEC``'s reply to ``reads``; ``StoreError`` if Redis refused any of it."""
        if not isinstance(reply, list) or any(isinstance(r, Exception) for r in reply):
            raise StoreError(f"the shared store (Redis) refused a read: {reply!r}")
        counts_flat, records, active, finished, run, wait, *minutes, procs = reply
        counts: dict[tuple[str, TaskStatus], int] = {}
        for field, n in _pairs(counts_flat):
            task_type, _, status = field.partition("\n")
            counts[(task_type, TaskStatus(status))] = int(n)
        counters = TaskCounters()
        counters.as_of = now
        for field, n in _pairs(finished):
            task_type, _, status = field.partition("\n")
            counters.finished[(task_type, status)] = int(n)
        counters.run = _histograms(run)
        counters.wait = _histograms(wait)
        for flat in minutes:
            for field, n in _pairs(flat):
                minute, _, status = field.partition("\n")
                row = counters.minutes.setdefault(int(minute), [0, 0, 0])
                row[_COLUMN[status]] += int(n)
        return cls(counts, int(records), int(active or 0), counters, list(procs))

    def add(self, other: Totals) -> None:
        """Add another shard's totals to these (its processes are not: every
        process announces itself under the home base, whose totals these are)."""
        self.records += other.records
        self.active += other.active
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        mine, theirs = self.counters, other.counters
        for field, n in theirs.finished.items():
            mine.finished[field] = mine.finished.get(field, 0) + n
        for own, more in ((mine.run, theirs.run), (mine.wait, theirs.wait)):
            for task_type, h in more.items():
                have = own.get(task_type)
                if have is None:
                    own[task_type] = h
                else:
                    have.buckets = [a + b for a, b in zip(have.buckets, h.buckets, strict=True)]
                    have.sum += h.sum
                    have.count += h.count
        for minute, row in theirs.minutes.items():
            into = mine.minutes.setdefault(minute, [0, 0, 0])
            for i, n in enumerate(row):
                into[i] += n


def others(space: RedisSpace, procs: Sequence[str]) -> Command:
    """Read the series the given processes published."""
    return ("MGET", tuple(space.key(keys.SERIES + p) for p in procs))


def series(reply: Sequence[str | None]) -> list[ProcessSeries]:
    """``MGET``'s reply to ``others``: the series found (a process that has not
    published yet, or whose series lapsed, is left out)."""
    found = (ProcessSeries.from_json(text) for text in reply if text is not None)
    return [s for s in found if s is not None and s.process is not None]


#: Queues one more command of the batch with the function that answers from its
#: reply (the engine's ``_send``, bound to the caller's future).
Then = Callable[[str, Sequence[str], Callable[[Any], object]], Deferred]


class StatsRead:
    """One ``Stats`` answered from Redis: this process's series as they are now,
    written first (``publish``), the deployment's counts (``reads``), then the other
    live processes' series (``others``)."""

    __slots__ = ("actor", "bases", "mine", "now", "space")

    def __init__(self, space: RedisSpace, actor: Host, proc: str, bases: list[str]) -> None:
        self.space = space
        self.actor = actor
        self.now = actor.now
        self.mine = actor.series(proc)
        #: The shards read (the home base first).
        self.bases = bases

    def commands(self) -> list[list[Command]]:
        """What to send now: this process's series, then each shard's reads, whose
        last command's reply (``EXEC``) goes to ``done``, in order."""
        first = [publish(self.space, self.mine)]
        return [first + reads(self.space, self.now, self.bases[0])] + [
            reads(self.space, self.now, base) for base in self.bases[1:]
        ]

    def done(self, replies: Sequence[Sequence[Any]], then: Then) -> TrackerStats | Deferred:
        """The answer, once every ``EXEC`` replied; or, when other processes are
        live, the read of their series (queued with ``then``), which answers."""
        t = Totals.decode(replies[0], self.now)
        for reply in replies[1:]:
            t.add(Totals.decode(reply, self.now))
        stats = self.actor.stats(t.counts, t.records, t.active, t.counters, [self.mine])
        procs = [p for p in t.procs if p != self.mine.process]
        if not procs:
            return stats

        def found(reply: Sequence[str | None]) -> TrackerStats:
            stats["processes"].extend(series(reply))
            return stats

        return then(*others(self.space, procs), found)


def _pairs(reply: Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """An ``HGETALL`` reply as (field, value) pairs: a map (RESP3, which redis-py
    speaks when the server does) or a flat array (RESP2)."""
    if isinstance(reply, Mapping):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _histograms(flat: Sequence[str] | Mapping[str, str]) -> dict[str, Histogram]:
    """``tally.lua``'s histogram hash (fields: slot and type, a newline between; slot
    ``s`` the sum) as one ``Histogram`` per type."""
    slots: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    for field, value in _pairs(flat):
        slot, _, task_type = field.partition("\n")
        if slot == "s":
            sums[task_type] = int(value) / 1_000_000  # kept in whole microseconds
        elif 0 < int(slot) <= len(BUCKETS) + 1:
            slots.setdefault(task_type, [0] * (len(BUCKETS) + 1))[int(slot) - 1] = int(value)
    return {t: Histogram.of(b, sums.get(t, 0.0), BUCKETS) for t, b in slots.items()}
