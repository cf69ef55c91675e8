"""The exceptions taskd raises.

Every error that is taskd's own derives from :class:`TaskdError`::

    TaskdError
    ├── TaskNotFound         a mutating call named an unknown, expired or evicted id
    ├── TaskConflict         an active task already holds (owner, task_type, resource_id)
    ├── InvalidTransition    the record's status does not allow the change
    ├── TrackerFull          the retention cap is full of active tasks
    └── TrackerClosed        the tracker is not open, is closing, or its actor died

Bad arguments are not ``TaskdError``: they raise the built-in ``ValueError`` or
``TypeError`` before any message reaches the actor.
"""

from __future__ import annotations

__all__ = [
    "InvalidTransition",
    "TaskConflict",
    "TaskNotFound",
    "TaskdError",
    "TrackerClosed",
    "TrackerFull",
]


class TaskdError(Exception):
    """Base class of every error taskd raises on its own account."""


class TaskNotFound(TaskdError):
    """No visible task has this id (never existed, expired, evicted or another owner's)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id


class TaskConflict(TaskdError):
    """An active task already holds the same (owner, task_type, resource_id) key.

    ``task_id`` names that active task so that callers can poll it instead.
    """

    def __init__(self, task_id: str, task_type: str, resource_id: str) -> None:
        super().__init__(
            f"an active {task_type!r} task for resource {resource_id!r} already exists: {task_id}"
        )
        self.task_id = task_id
        self.task_type = task_type
        self.resource_id = resource_id


class InvalidTransition(TaskdError):
    """The task's current status does not allow the requested change."""

    def __init__(self, task_id: str, current: str, action: str) -> None:
        super().__init__(f"cannot {action} task {task_id!r}: it is {current}")
        self.task_id = task_id
        self.current = current
        self.action = action


class TrackerFull(TaskdError):
    """Every slot of the retention cap holds an active task; nothing can be evicted."""


class TrackerClosed(TaskdError):
    """The tracker does not take commands: not yet open, closing, closed, or its actor died."""
