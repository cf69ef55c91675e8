"""Model check: random command sequences against the tracker and a small reference
model, compared after every step (transitions, dedup, owners, list order and
filters, cap and TTL, and that nothing active is ever evicted or expired)."""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, invariant, rule

import taskd
from taskd import TaskStatus as S

from ..conftest import Engine
from .conftest import REDIS, TrackerMachine, model_settings

T = TypeVar("T")
CAP = 6
TTL = {S.COMPLETED: 10.0, S.FAILED: 20.0, S.CANCELLED: 5.0}
OWNERS = st.sampled_from([None, "alice", "bob"])
TYPES = st.sampled_from(["a", "b"])
RESOURCES = st.sampled_from([None, "r1", "r2"])
ACTIVE = {S.PENDING, S.RUNNING, S.CANCELLING}


@dataclass
class ModelTask:
    task_id: str
    owner: str | None
    task_type: str
    resource_id: str | None
    status: S = S.PENDING
    finished_at: float | None = None


class TrackerModel(TrackerMachine):
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__(
            taskd.Retention(
                completed_ttl=TTL[S.COMPLETED],
                failed_ttl=TTL[S.FAILED],
                cancelled_ttl=TTL[S.CANCELLED],
                max_tasks=CAP,
            )
        )
        self.model: dict[str, ModelTask] = {}  # insertion order = creation order

    # --- the model -------------------------------------------------------------

    def expire(self) -> None:
        now = self.clock.now
        for tid, t in list(self.model.items()):
            if t.finished_at is not None and t.finished_at + TTL[t.status] <= now:
                del self.model[tid]

    def visible(self, tid: str, actor: object) -> ModelTask | None:
        t = self.model.get(tid)
        if t is None or (actor is not taskd.ANY_OWNER and t.owner != actor):
            return None
        return t

    def finish(self, t: ModelTask, status: S, finished_at: float | None) -> None:
        # TTL counts from the record's finished_at. It is the clock's reading, unless
        # that would put it before the record's last update (timestamps never go
        # backwards; ids created in one instant are a microsecond apart).
        assert finished_at is not None
        assert self.clock.now <= finished_at < self.clock.now + 0.001
        t.status = status
        t.finished_at = finished_at

    def expect(self, coro: Coroutine[Any, Any, Any], error: type[Exception] | None) -> Any:
        if error is None:
            return self.run(coro)
        try:
            self.run(coro)
        except error:
            return None
        raise AssertionError(f"expected {error.__name__}")

    # --- rules -----------------------------------------------------------------

    @rule(target=tasks, owner=OWNERS, task_type=TYPES, resource_id=RESOURCES)
    def create(self, owner: str | None, task_type: str, resource_id: str | None) -> str:
        self.expire()
        holder = next(
            (
                t
                for t in self.model.values()
                if resource_id is not None
                and (t.owner, t.task_type, t.resource_id) == (owner, task_type, resource_id)
                and t.status in ACTIVE
            ),
            None,
        )
        if holder is not None:
            try:
                self.run(self.tracker.create(task_type, resource_id=resource_id, owner=owner))
            except taskd.TaskConflict as exc:
                assert exc.task_id == holder.task_id
                return holder.task_id
            raise AssertionError("expected TaskConflict")
        if len(self.model) >= CAP:
            terminal = [t for t in self.model.values() if t.status not in ACTIVE]
            if not terminal:
                self.expect(self.tracker.create(task_type, owner=owner), taskd.TrackerFull)
                return "no-such-task"
            del self.model[terminal[0].task_id]  # the oldest terminal one goes
        rec = self.run(self.tracker.create(task_type, resource_id=resource_id, owner=owner))
        assert rec.status is S.PENDING
        self.model[rec.task_id] = ModelTask(rec.task_id, owner, task_type, resource_id)
        return rec.task_id

    def _mutate(self, tid: str, actor: object, allowed: dict[S, S], call: Any) -> None:
        self.expire()
        t = self.visible(tid, actor)
        if t is None:
            self.expect(call, taskd.TaskNotFound)
        elif t.status in allowed:
            rec = self.run(call)
            target = allowed[t.status]
            assert rec.status is target, (rec.status, target)
            if target is t.status and target not in ACTIVE:
                return  # idempotent on a terminal task (cancel): nothing changed
            if target in ACTIVE:
                t.status = target
            else:
                self.finish(t, target, rec.finished_at)
        else:
            self.expect(call, taskd.InvalidTransition)

    @rule(tid=tasks, actor=st.sampled_from([taskd.ANY_OWNER, None, "alice", "bob"]))
    def start(self, tid: str, actor: object) -> None:
        call = self.tracker.start(tid, owner=actor)  # type: ignore[arg-type]
        self._mutate(tid, actor, {S.PENDING: S.RUNNING}, call)

    @rule(tid=tasks, actor=st.sampled_from([taskd.ANY_OWNER, "alice"]))
    def progress(self, tid: str, actor: object) -> None:
        call = self.tracker.progress(tid, 0.5, owner=actor)  # type: ignore[arg-type]
        self._mutate(tid, actor, {s: s for s in ACTIVE}, call)

    @rule(tid=tasks)
    def complete(self, tid: str) -> None:
        call = self.tracker.complete(tid, {"ok": True})
        allowed = {S.RUNNING: S.COMPLETED, S.CANCELLING: S.COMPLETED}
        self._mutate(tid, taskd.ANY_OWNER, allowed, call)

    @rule(tid=tasks)
    def fail(self, tid: str) -> None:
        call = self.tracker.fail(tid, "boom")
        self._mutate(tid, taskd.ANY_OWNER, {s: S.FAILED for s in ACTIVE}, call)

    @rule(tid=tasks, actor=st.sampled_from([taskd.ANY_OWNER, None, "bob"]))
    def cancel(self, tid: str, actor: object) -> None:
        call = self.tracker.cancel(tid, owner=actor)  # type: ignore[arg-type]
        allowed = {S.PENDING: S.CANCELLED, S.RUNNING: S.CANCELLING}
        # idempotent (docs/http-api.md): asked before, or done, changes nothing
        allowed |= {S.CANCELLING: S.CANCELLING, S.CANCELLED: S.CANCELLED}
        self._mutate(tid, actor, allowed, call)

    @rule(tid=tasks)
    def confirm_cancel(self, tid: str) -> None:
        """The worker acknowledges: cancelled from any active status."""
        call = self.tracker.cancel(tid, confirm=True)
        allowed = {s: S.CANCELLED for s in (*ACTIVE, S.CANCELLED)}
        self._mutate(tid, taskd.ANY_OWNER, allowed, call)

    @rule(tid=tasks)
    def delete(self, tid: str) -> None:
        self.expire()
        t = self.model.get(tid)
        call = self.tracker.delete(tid)
        if t is None:
            self.expect(call, taskd.TaskNotFound)
        elif t.status in ACTIVE:
            self.expect(call, taskd.InvalidTransition)
        else:
            self.run(call)
            del self.model[tid]

    @rule(seconds=st.sampled_from([1.0, 4.0, 6.0, 11.0, 25.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # --- invariants ------------------------------------------------------------

    @invariant()
    def listing_matches_the_model(self) -> None:
        self.expire()
        recs = self.run(self.tracker.list(limit=200))
        expected = list(reversed(self.model))
        assert [r.task_id for r in recs] == expected
        assert [r.status for r in recs] == [self.model[i].status for i in expected]
        for status in S:
            got = [r.task_id for r in self.run(self.tracker.list(status=status, limit=200))]
            assert got == [i for i in expected if self.model[i].status is status]
        for owner in (None, "alice"):
            got = [r.task_id for r in self.run(self.tracker.list(owner=owner, limit=200))]
            assert got == [i for i in expected if self.model[i].owner == owner]
        got = [r.task_id for r in self.run(self.tracker.list(resource_id="r1", limit=200))]
        assert got == [i for i in expected if self.model[i].resource_id == "r1"]
        # pages of two walk the same order
        seen: list[str] = []
        page = self.run(self.tracker.list_page(limit=2))
        while True:
            seen += [r.task_id for r in page.records]
            if page.next_cursor is None:
                break
            page = self.run(self.tracker.list_page(limit=2, cursor=page.next_cursor))
        assert seen == expected

    @invariant()
    def cap_holds(self) -> None:
        # The tracker's own count and its listing, not the model's size: the cap is a
        # promise about what the engine holds.
        stats = self.run(self.tracker.stats())
        listed = self.run(self.tracker.list(limit=200))
        assert stats["records"] == len(listed) <= CAP, (stats["records"], len(listed))
        assert stats["active"] == sum(r.status in ACTIVE for r in listed) <= CAP


TrackerModel.TestCase.settings = model_settings(200, 40)
test_tracker_model = TrackerModel.TestCase


class RedisTrackerModel(TrackerModel):
    """The same model, against a shared task space on a real Redis (a fresh key
    prefix per example; time still comes from the fake clock: the caller's)."""

    def engine(self) -> Engine:
        return {"redis": REDIS[0], "redis_prefix": f"model-{uuid.uuid4().hex}:"}


RedisTrackerModel.TestCase.settings = model_settings(100, 40)
test_tracker_model_on_redis = RedisTrackerModel.TestCase
