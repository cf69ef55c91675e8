"""The reference scenario as a FastAPI app: committing a session in the background.

``POST /api/v1/sessions/{session_id}/commit?wait=false`` answers 202 with a task id
that clients poll at ``/api/v1/tasks/{task_id}`` (the task API, mounted from
``taskd.asgi``); ``wait=true`` (the default) runs the commit inline under the same
dedup key; while a commit of the session runs, either answers 409. Run it with::

    uvicorn examples.fastapi_app:app      # serves on http://127.0.0.1:8000
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse

import taskd
import taskd.asgi

CommitFn = Callable[[str], Awaitable[dict[str, taskd.JSON]]]
TASK_TYPE = "session_commit"
API = "/api/v1"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


async def simulated_commit(session_id: str) -> dict[str, taskd.JSON]:
    """Stand-in for real work: a few stages with progress, then a summary."""
    stages = ["loading messages", "extracting memories", "writing index"]
    for i, stage in enumerate(stages):
        taskd.report_progress(i / len(stages), stage)
        await asyncio.sleep(0.05 + random.random() * 0.05)
    return {"memories_extracted": random.randint(1, 20)}


def _error(status: int, code: str, message: str, details: dict[str, taskd.JSON]) -> JSONResponse:
    body = {"status": "error", "error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status)


def create_app(commit: CommitFn | None = None) -> FastAPI:
    """The example application; ``commit(session_id)`` does the work."""
    do_commit: CommitFn = commit or simulated_commit
    tracker = taskd.Tracker()
    tasks = taskd.asgi.app(tracker)
    # The tracker starts and drains with the app: a mounted app gets no lifespan of
    # its own, so the host's enters the task API's.
    app = FastAPI(lifespan=tasks.lifespan)

    @app.post(API + "/sessions/{session_id}/commit")
    async def commit_session(session_id: str, wait: str = "true") -> JSONResponse:
        if wait.lower() not in _TRUE | _FALSE:
            return _error(
                400, "INVALID_ARGUMENT", "wait must be true or false", {"parameter": "wait"}
            )

        async def run() -> dict[str, taskd.JSON]:
            return dict(await do_commit(session_id))

        try:
            handle = await tracker.spawn(run(), task_type=TASK_TYPE, resource_id=session_id)
        except taskd.TaskConflict as exc:
            message = f"Session {session_id} already has a commit in progress"
            return _error(409, "CONFLICT", message, {"task_id": exc.task_id})
        if wait.lower() in _FALSE:
            result = {"session_id": session_id, "status": "accepted", "task_id": handle.task_id}
            location = f"{API}/tasks/{handle.task_id}"
            return JSONResponse(
                {"status": "ok", "result": result}, status_code=202, headers={"Location": location}
            )
        try:
            done = await handle
        except Exception as exc:  # the commit failed: say so, redacted, without a trace
            return _error(500, "INTERNAL", taskd.redact(f"commit failed: {exc}"), {})
        body = {"session_id": session_id, "status": "committed", **done}
        return JSONResponse({"status": "ok", "result": body})

    # The task API (GET /api/v1/tasks/{id}, long-poll, events, …), /health, /metrics
    # and the dashboard: every path the routes above do not take.
    app.mount("/", tasks)
    return app


app = create_app()
