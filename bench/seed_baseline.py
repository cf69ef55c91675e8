"""A stand-in for the seed's tracker (SPEC §14), written from its description.

One ``threading.Lock`` over a dict of plain dataclass records; every read deep-copies;
the duplicate check and ``list`` scan every record. Used only as the baseline that
bench scripts measure taskd against in the same run.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeedRecord:
    task_id: str
    task_type: str
    status: str = "pending"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    resource_id: str | None = None
    result: Any = None
    error: str | None = None


class SeedTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, SeedRecord] = {}

    def create_if_no_running(self, task_type: str, resource_id: str) -> SeedRecord | None:
        with self._lock:
            for rec in self._tasks.values():  # linear duplicate scan
                if (
                    rec.task_type == task_type
                    and rec.resource_id == resource_id
                    and rec.status in ("pending", "running")
                ):
                    return None
            rec = SeedRecord(str(uuid.uuid4()), task_type, resource_id=resource_id)
            self._tasks[rec.task_id] = rec
            return copy.deepcopy(rec)

    def create(self, task_type: str, resource_id: str | None = None) -> SeedRecord:
        with self._lock:
            rec = SeedRecord(str(uuid.uuid4()), task_type, resource_id=resource_id)
            self._tasks[rec.task_id] = rec
            return copy.deepcopy(rec)

    def finish(
        self, task_id: str, status: str, result: Any = None, error: str | None = None
    ) -> None:
        with self._lock:
            rec = self._tasks[task_id]
            rec.status = status
            rec.result = result
            rec.error = error
            rec.updated_at = time.time()

    def get(self, task_id: str) -> SeedRecord | None:
        with self._lock:
            rec = self._tasks.get(task_id)
            return copy.deepcopy(rec) if rec else None

    def list(self, status: str | None = None, limit: int = 50) -> list[SeedRecord]:
        with self._lock:
            recs = [r for r in self._tasks.values() if status is None or r.status == status]
            recs.sort(key=lambda r: r.created_at, reverse=True)
            return [copy.deepcopy(r) for r in recs[:limit]]
