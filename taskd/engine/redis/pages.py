"""A page of records from Redis, read with plain commands (no server-side script).

A listing needs no atomicity: it reads an index (a sorted set of ids, walked by lex:
ids sort in creation order) and fetches the records it names with one ``MGET``, then
keeps those that match every filter, judged on the records themselves. An id whose
record moved on in between (another status, deleted) simply does not match, so the
page is right for the records it shows, as a page of the local engine is.

``Walk`` is the walk of one ``ListTasks`` as a small state machine: each step hands
the engine the commands of one round trip (sent in the actor's batch pipeline) and
takes their replies. A common page (no filter, or one) is two round trips: the index,
then the records; several filters first ask each index's size (``ZCARD``) to walk the
smallest. At most ``WALK_BOUND`` ids are examined per call: a filter that matches
nothing answers an empty page with a cursor to go on from (``Tracker.list`` follows it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Final

from ..._models import ANY_OWNER, TaskRecord
from ...actor import messages as m
from ..state import Page
from . import keys

__all__ = ["CHUNK", "WALK_BOUND", "Merge", "Step", "Walk"]

#: Ids examined by one list call at most (the rest of the walk is the next call's).
WALK_BOUND: Final = 1000
#: Ids read from an index per round trip at most (the first read asks for a page).
CHUNK: Final = 256

#: One round trip's commands: (Redis command, arguments).
Step = list[tuple[str, tuple[str, ...]]]


class Walk:
    """One listing's walk; ``start`` gives the first round trip's commands, ``feed``
    takes their replies and returns the next commands, or the finished ``Page``."""

    __slots__ = (
        "_batch",
        "_chunk",
        "_cursor",
        "_decode",
        "_examined",
        "_index",
        "_key",
        "_last",
        "_msg",
        "_options",
        "_out",
        "_safe",
        "_sizing",
    )

    def __init__(
        self,
        msg: m.ListTasks,
        key: Callable[[str], str],
        decode: Callable[[str], tuple[TaskRecord, int]],
    ) -> None:
        self._msg = msg
        self._key = key
        self._decode = decode
        # Each option is the index keys that together hold every match of one filter
        # (several statuses: several keys); the smallest is walked.
        options: list[list[str]] = []
        if msg.statuses is not None:
            options.append([key(keys.BY_STATUS + s.value) for s in sorted(msg.statuses)])
        if msg.task_type is not None:
            options.append([key(keys.BY_TYPE + msg.task_type)])
        if msg.resource_id is not None:
            options.append([key(keys.BY_RESOURCE + msg.resource_id)])
        owner = msg.owner
        if owner is None:
            options.append([key(keys.UNOWNED)])
        elif owner is not ANY_OWNER:
            options.append([key(keys.BY_OWNER + owner)])
        self._options = options
        self._index = options[0] if len(options) == 1 else [key(keys.ALL)]
        self._sizing = len(options) > 1
        if msg.parent_id is not None:
            # A parent's children: their index, whatever the other filters.
            self._index = [key(keys.BY_PARENT + msg.parent_id)]
            self._sizing = False
        self._cursor = msg.before or ""
        self._chunk = min(CHUNK, msg.limit + 1)
        self._examined = 0
        self._out: list[TaskRecord] = []
        self._last: str | None = None
        self._safe: str | None = None
        self._batch: list[str] = []

    def start(self) -> Step:
        """The first round trip: the indexes' sizes, or the first ids."""
        if self._sizing:
            return [("ZCARD", (k,)) for option in self._options for k in option]
        return self._range()

    def feed(self, replies: Sequence[object]) -> Step | Page:
        """The replies of the last step's commands: the next step, or the page."""
        if self._sizing:
            self._sizing = False
            sizes = iter(replies)
            best: int | None = None
            for option in self._options:
                size = sum(int(next(sizes)) for _ in option)  # type: ignore[call-overload]
                if best is None or size < best:
                    best, self._index = size, option
            return self._range()
        if not self._batch:
            return self._ids(replies)
        return self._records(replies[0])

    def _range(self) -> Step:
        top = "(" + self._cursor if self._cursor else "+"
        limit = ("LIMIT", "0", str(self._chunk))
        return [("ZREVRANGEBYLEX", (k, top, "-", *limit)) for k in self._index]

    def _ids(self, replies: Sequence[object]) -> Step | Page:
        # Merge the indexes' ids, newest first. An index that filled its chunk may
        # hold more ids below its last one than the others show: only ids down to the
        # highest such last id are certain to be complete (``safe``).
        merged: set[str] = set()
        safe: str | None = None
        for ids in replies:
            assert isinstance(ids, list)
            merged.update(ids)
            if len(ids) == self._chunk and (safe is None or ids[-1] > safe):
                safe = ids[-1]
        self._safe = safe
        batch = sorted(merged, reverse=True)
        if safe is not None:
            batch = [i for i in batch if i >= safe]
        batch = batch[: WALK_BOUND - self._examined]
        if not batch:
            return Page(tuple(self._out), None)
        self._chunk = min(CHUNK, self._chunk * 2)
        self._batch = batch
        return [("MGET", tuple(self._key(keys.RECORD + i) for i in batch))]

    def _records(self, texts: object) -> Step | Page:
        assert isinstance(texts, list)
        msg = self._msg
        owner, statuses = msg.owner, msg.statuses
        out = self._out
        batch, self._batch = self._batch, []
        for task_id, text in zip(batch, texts, strict=True):
            self._cursor = task_id
            self._examined += 1
            if text is not None:
                rec = self._decode(text)[0]
                if (
                    (owner is ANY_OWNER or rec.owner == owner)
                    and (statuses is None or rec.status in statuses)
                    and (msg.task_type is None or rec.task_type == msg.task_type)
                    and (msg.resource_id is None or rec.resource_id == msg.resource_id)
                    and (msg.stage is None or rec.stage == msg.stage)
                    and (msg.parent_id is None or rec.parent_id == msg.parent_id)
                ):
                    if len(out) == msg.limit:
                        # one more match than the page holds: there is a next page
                        return Page(tuple(out), self._last)
                    out.append(rec)
                    self._last = task_id
            if self._examined >= WALK_BOUND:
                return Page(tuple(out), self._cursor)
        if self._safe is None:  # every index is read to its end
            return Page(tuple(out), None)
        return self._range()


class Merge:
    """An admin's listing on a Redis Cluster: one ``Walk`` per shard, stepped
    together (each round trip carries every unfinished walk's commands), then their
    pages merged. Ids sort in creation order across shards, so the merged page is
    exact with the same cursor as one shard's: each walk's matches are complete
    down to its own cursor, the merge keeps what lies above the highest of those,
    and the next page goes on from where it stopped."""

    __slots__ = ("_limit", "_pages", "_steps", "_walks")

    def __init__(
        self,
        msg: m.ListTasks,
        bases: Sequence[str],
        key: Callable[[str, str], str],
        decode: Callable[[str], tuple[TaskRecord, int]],
    ) -> None:
        self._limit = msg.limit
        self._walks = {b: Walk(msg, functools.partial(_keyed, key, b), decode) for b in bases}
        self._steps: dict[str, Step] = {}
        self._pages: list[Page] = []

    def start(self) -> Step:
        """Every walk's first round trip."""
        self._steps = {b: w.start() for b, w in self._walks.items()}
        return [c for step in self._steps.values() for c in step]

    def feed(self, replies: Sequence[object]) -> Step | Page:
        """The replies of the last step: the next step, or the merged page."""
        at = 0
        steps: dict[str, Step] = {}
        for base, step in self._steps.items():
            nxt = self._walks[base].feed(replies[at : at + len(step)])
            at += len(step)
            if isinstance(nxt, Page):
                self._pages.append(nxt)
            else:
                steps[base] = nxt
        self._steps = steps
        if steps:
            return [c for step in steps.values() for c in step]
        cursors = [p.next_cursor for p in self._pages if p.next_cursor is not None]
        bound = max(cursors) if cursors else None
        found = sorted(
            (r for p in self._pages for r in p.records if bound is None or r.task_id >= bound),
            key=lambda r: r.task_id,
            reverse=True,
        )
        if len(found) > self._limit:
            return Page(tuple(found[: self._limit]), found[self._limit - 1].task_id)
        return Page(tuple(found), bound)


def _keyed(key: Callable[[str, str], str], base: str, suffix: str) -> str:
    return key(suffix, base)
