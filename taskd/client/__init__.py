"""Clients for the taskd HTTP API: ``TaskdClient`` (async, on aiohttp) and
``SyncTaskdClient`` (blocking, on httpx), with the same methods and answers.

One method per route; records come back as ``taskd.TaskRecord``. Error envelopes
become the exception the server raised, rebuilt from the envelope's code and details
through the error table in ``taskd._errors``: ``TaskNotFound`` (404), ``TaskConflict``
(409 ``CONFLICT``, with ``task_id``, ``task_type`` and ``resource_id``),
``InvalidTransition`` (409 ``FAILED_PRECONDITION``), ``QuotaExceeded`` (429),
``TrackerFull``/``TrackerClosed``/``StoreError`` (503), and ``ApiError`` for the rest.
Every one carries ``.http_status``, ``.code`` and ``.retry_after``. A server that
cannot be reached raises ``ServerUnreachable``.
"""

from ._aio import TaskdClient
from ._calls import DEFAULT_URL, ApiError, ClientPage, ServerUnreachable
from ._sync import SyncTaskdClient

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "ClientPage",
    "ServerUnreachable",
    "SyncTaskdClient",
    "TaskdClient",
]
