"""taskd: track background operations in asyncio programs.

One actor task owns every task record; ``Tracker`` is the handle to it. See
``taskd.web`` for the aiohttp integration and HTTP API.
"""

from __future__ import annotations

from ._errors import (
    InvalidTransition,
    QuotaExceeded,
    StoreError,
    TaskConflict,
    TaskdError,
    TaskNotFound,
    TrackerClosed,
    TrackerFull,
)
from ._models import ANY_OWNER, JSON, AnyOwner, TaskRecord, TaskSpec, TaskStatus
from ._redact import redact
from ._retention import Retention
from ._webhooks import Webhooks
from .actor.runner import report_progress
from .engine.sqlite import SQLiteStore
from .engine.store import MemoryStore, Store
from .handle import TaskHandle, TaskPage, TrackerState, WouldBlock
from .tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "ANY_OWNER",
    "JSON",
    "AnyOwner",
    "InvalidTransition",
    "MemoryStore",
    "QuotaExceeded",
    "Retention",
    "SQLiteStore",
    "Store",
    "StoreError",
    "TaskConflict",
    "TaskHandle",
    "TaskNotFound",
    "TaskPage",
    "TaskRecord",
    "TaskSpec",
    "TaskStatus",
    "TaskdError",
    "Tracker",
    "TrackerClosed",
    "TrackerFull",
    "TrackerState",
    "Webhooks",
    "WouldBlock",
    "__version__",
    "redact",
    "report_progress",
]
