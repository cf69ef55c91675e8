"""An aiohttp app embedding taskd on a shared Redis task space, with a route that
spawns a coroutine in this process: what the multi-process tests run as "a worker".

    python -m tests.redis_worker PORT REDIS_URL PREFIX [cluster]

(with ``cluster``, REDIS_URL names a node of a Redis Cluster)
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

import taskd
import taskd.web


async def spawn(request: web.Request) -> web.Response:
    seconds = float(request.query.get("seconds", "60"))

    async def work() -> str:
        await asyncio.sleep(seconds)
        return "done"

    handle = await taskd.web.spawn(request, work(), task_type="work")
    return web.json_response({"task_id": handle.task_id})


async def stats(request: web.Request) -> web.Response:
    s = await taskd.web.get_tracker(request).stats()
    return web.json_response({"runners": s["runners"]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    port, url, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = web.Application()
    if sys.argv[4:] == ["cluster"]:
        taskd.web.setup(app, redis_cluster=url, redis_prefix=prefix, close_timeout=0.5)
    else:
        taskd.web.setup(app, redis=url, redis_prefix=prefix, close_timeout=0.5)
    app.router.add_post("/spawn", spawn)
    app.router.add_get("/runners", stats)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
