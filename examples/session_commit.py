"""The reference scenario rebuilt on taskd: committing a session in the background.

``POST /api/v1/sessions/{session_id}/commit?wait=false`` answers 202 with a task id
that clients poll at ``/api/v1/tasks/{task_id}``; ``wait=true`` (the default) runs the
commit inline under the same dedup key. Run it with::

    python examples/session_commit.py      # serves on http://127.0.0.1:8081
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from aiohttp import web

import taskd
import taskd.web

CommitFn = Callable[[str], Awaitable[dict[str, taskd.JSON]]]
TASK_TYPE = "session_commit"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


async def simulated_commit(session_id: str) -> dict[str, taskd.JSON]:
    """Stand-in for real work: a few stages with progress, then a summary."""
    stages = ["loading messages", "extracting memories", "writing index"]
    for i, stage in enumerate(stages):
        taskd.report_progress(i / len(stages), stage)
        await asyncio.sleep(0.05 + random.random() * 0.05)
    return {"memories_extracted": random.randint(1, 20)}


def _conflict(session_id: str, task_id: str) -> web.Response:
    return taskd.web.error_response(
        409,
        "CONFLICT",
        f"Session {session_id} already has a commit in progress",
        {"task_id": task_id},
    )


def create_app(commit: CommitFn | None = None) -> web.Application:
    """The example application; ``commit(session_id)`` does the work."""
    do_commit: CommitFn = commit or simulated_commit
    app = web.Application()
    taskd.web.setup(app)

    async def commit_session(request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        wait_text = request.query.get("wait", "true").lower()
        if wait_text not in _TRUE | _FALSE:
            return taskd.web.error_response(
                400, "INVALID_ARGUMENT", "wait must be true or false", {"parameter": "wait"}
            )

        async def run() -> dict[str, taskd.JSON]:
            return dict(await do_commit(session_id))

        try:
            handle = await taskd.web.spawn(
                request, run(), task_type=TASK_TYPE, resource_id=session_id
            )
        except taskd.TaskConflict as exc:
            return _conflict(session_id, exc.task_id)
        if wait_text in _FALSE:
            return taskd.web.accepted(
                request, handle, {"session_id": session_id, "status": "accepted"}
            )
        try:
            result = await handle
        except Exception as exc:  # the commit failed: say so, redacted, without a trace
            return taskd.web.error_response(500, "INTERNAL", taskd.redact(f"commit failed: {exc}"))
        # ``await handle`` is typed as run()'s return value: no narrowing needed.
        body: dict[str, taskd.JSON] = {"session_id": session_id, "status": "committed", **result}
        return web.json_response({"status": "ok", "result": body})

    app.router.add_post("/api/v1/sessions/{session_id}/commit", commit_session)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=8081)
