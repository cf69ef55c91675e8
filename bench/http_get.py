"""bench/http_get.py: GET /api/v1/tasks/{id} on taskd vs a bare aiohttp handler.

Both servers answer the same bytes; the same load generator (wrk, 32 connections)
hits each in turn, alternating, one server process each, on the same event loop.
Prints requests/s, p50 and p99 latency of both and the throughput ratio (goal >= 0.9x).

``--target serve`` (the default) runs ``taskd serve`` itself, as users do;
``--target create_app`` runs ``taskd.web.create_app()`` under ``web.run_app``.
``--loop uvloop`` runs both servers on uvloop (``taskd serve --loop uvloop``).

Run: python bench/http_get.py [--target serve|create_app] [--loop asyncio|uvloop]
                              [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def serve(kind: str, port: int, body_file: str, loop: str) -> None:
    sys.path.insert(0, str(ROOT))
    from aiohttp import web

    import taskd.web

    if kind == "taskd":
        app = taskd.web.create_app()

        async def seed(app: web.Application) -> None:
            tracker = taskd.web.get_tracker(app)
            rec = await tracker.create("bench", resource_id="r1", metadata={"by": "bench"})
            await tracker.start(rec.task_id)
            await tracker.complete(rec.task_id, {"docs": 120, "items": ["a", "b", "c"]})
            Path(body_file).write_text(rec.task_id)  # noqa: ASYNC240 (tiny, at startup)

        app.on_startup.append(seed)
    else:
        app = web.Application()
        payload = Path(body_file).read_bytes()

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=payload, content_type="application/json")

        app.router.add_get("/api/v1/tasks/{task_id}", handler)
    if loop == "uvloop":
        import uvloop

        web.run_app(
            app,
            host="127.0.0.1",
            port=port,
            print=None,
            access_log=None,
            loop=uvloop.new_event_loop(),
        )
    else:
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str) -> None:
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up")


def start(kind: str, port: int, body_file: Path, loop: str) -> subprocess.Popen[bytes]:
    if kind == "serve":
        argv = ["-m", "taskd", "serve", "--port", str(port), "--loop", loop]
        argv += ["--log-level", "WARNING"]
    else:
        argv = [__file__, "--serve", kind, str(port), str(body_file), loop]
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, cwd=ROOT)


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req) as resp:
        out: dict[str, object] = json.loads(resp.read())
        return out


def seed_over_http(base: str) -> str:
    """The task the bench reads, made through the API (taskd serve)."""
    rec = post(
        f"{base}/api/v1/tasks",
        {"task_type": "bench", "resource_id": "r1", "metadata": {"by": "bench"}},
    )
    task_id = str(rec["result"]["task_id"])  # type: ignore[index]
    post(f"{base}/api/v1/tasks/{task_id}/start", {})
    post(
        f"{base}/api/v1/tasks/{task_id}/complete",
        {"result": {"docs": 120, "items": ["a", "b", "c"]}},
    )
    return task_id


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, duration: int) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * _UNITS[m.group(2)]

    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(out)
    return rps, pct("50"), pct("99")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["serve", "create_app"], default="serve")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    tmp = Path("/tmp") / f"taskd-bench-{time.time_ns()}"
    tmp.mkdir()
    id_file, body_file = tmp / "id", tmp / "body"
    tport, bport = free_port(), free_port()
    tproc = start("taskd" if args.target == "create_app" else "serve", tport, id_file, args.loop)
    try:
        wait_up(f"http://127.0.0.1:{tport}/health")
        if args.target == "serve":
            task_id = seed_over_http(f"http://127.0.0.1:{tport}")
        else:
            task_id = id_file.read_text()
        turl = f"http://127.0.0.1:{tport}/api/v1/tasks/{task_id}"
        body = urllib.request.urlopen(turl).read()
        assert json.loads(body)["result"]["status"] == "completed"
        body_file.write_bytes(body)
        bproc = start("bare", bport, body_file, args.loop)
        try:
            burl = f"http://127.0.0.1:{bport}/api/v1/tasks/{task_id}"
            wait_up(burl)
            assert urllib.request.urlopen(burl).read() == body
            wrk(turl, 1), wrk(burl, 1)  # warm up both
            ours: list[tuple[float, float, float]] = []
            bare: list[tuple[float, float, float]] = []
            for _ in range(args.rounds):
                ours.append(wrk(turl, args.duration))
                bare.append(wrk(burl, args.duration))
        finally:
            bproc.terminate()
            bproc.wait()
    finally:
        tproc.terminate()
        tproc.wait()
    o = max(ours)
    b = max(bare)
    print(f"{'GET /api/v1/tasks/{id}':<32} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    label = "taskd serve" if args.target == "serve" else "taskd create_app"
    print(f"{label + ' (' + args.loop + ')':<32} {o[0]:>10,.0f} {o[1]:>8.2f} {o[2]:>8.2f}")
    print(f"{'bare aiohttp handler':<32} {b[0]:>10,.0f} {b[1]:>8.2f} {b[2]:>8.2f}")
    print(
        f"throughput ratio {o[0] / b[0]:.2f}x  (goal >= 0.9x; best of {args.rounds} alternated rounds, wrk -t1 -c32)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
