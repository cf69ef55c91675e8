"""``taskd serve --workers N``: the supervisor that runs N copies of ``taskd serve`` on
one port (SO_REUSEPORT) and stops them together, and the watch each worker keeps on
its supervisor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .. import __version__
from ._common import EXIT_OK, EXIT_START, CliError

#: Set in each worker process of ``--workers N`` to its index (0 runs the demo).
WORKER_ENV = "TASKD_WORKER_INDEX"
#: Set in each worker to the file descriptor of the read end of the supervisor's pipe:
#: end of file on it means the supervisor is gone.
PIPE_ENV = "TASKD_SUPERVISOR_FD"
#: How long a worker whose supervisor died may take to stop before it exits anyway
#: (docs/cli.md: "workers end within 5 s of their supervisor").
_ORPHAN_DEADLINE = 4.0
#: How long the supervisor waits for its workers to stop before it kills them.
_STOP_DEADLINE = 15.0

__all__ = ["WORKER_ENV", "check_port_free", "child_argv", "supervise", "watch_supervisor"]

log = logging.getLogger("taskd")


def child_argv(argv: list[str]) -> list[str]:
    """The command line minus ``--workers``: each worker is one process."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def check_port_free(host: str, port: int) -> None:
    """Bind the port once without ``SO_REUSEPORT``: it fails if anything listens there
    (another server, or the workers of another ``--workers`` supervisor, which would
    otherwise share the port with ours). One line, before any worker starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: {exc.strerror} (--host)", EXIT_START
        ) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {host}:{port}: {exc.strerror} (--port)", EXIT_START
                ) from None


def watch_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a worker of ``--workers N``: stop when the supervisor dies, however it died.

    The supervisor holds the write end of a pipe and never writes; the kernel closes
    it when the supervisor exits, even on SIGKILL, and this worker then reads end of
    file. A thread blocked in ``read`` needs nothing from the event loop, so it works
    on any loop and even if the loop is stuck: after asking for a clean stop it gives
    the worker ``_ORPHAN_DEADLINE`` seconds, then ends the process."""
    text = os.environ.get(PIPE_ENV)
    if not text:
        return
    fd = int(text)

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        log.warning("the supervisor is gone: stopping this worker")
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(stop.set)
        time.sleep(_ORPHAN_DEADLINE)
        log.error("still running %gs after the supervisor died: exiting", _ORPHAN_DEADLINE)
        logging.shutdown()
        os._exit(EXIT_START)

    threading.Thread(target=watch, name="taskd-supervisor-watch", daemon=True).start()


def supervise(args: argparse.Namespace) -> int:
    """``--workers N``: run N copies of this command on one port (SO_REUSEPORT) and
    stop them together. A worker that dies is started again; one that cannot start
    stops them all (exit 1). Workers watch a pipe from the supervisor and stop when
    it dies (SIGKILL included); the supervisor kills workers that do not stop."""
    if not args.redis and not args.redis_cluster:
        raise CliError(
            "--workers needs --redis (or --redis-cluster): separate processes share tasks "
            "only through Redis",
            EXIT_START,
        )
    if args.port == 0:
        raise CliError("--workers needs a fixed --port (not 0)", EXIT_START)
    check_port_free(args.host, args.port)
    argv = [sys.executable, "-m", "taskd", *child_argv(list(args.argv))]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The read end goes to every worker; the write end (close-on-exec) stays here, so
    # that it closes exactly when this process ends.
    watch_fd, lifeline = os.pipe()

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            **{WORKER_ENV: str(index), "TASKD_WORKERS": "1", PIPE_ENV: str(watch_fd)},
        )
        return subprocess.Popen(argv, env=env, pass_fds=(watch_fd,))

    procs = {i: start(i) for i in range(args.workers)}
    started = {i: time.monotonic() for i in procs}
    log.info("taskd %s: %d workers on port %d", __version__, args.workers, args.port)
    status = EXIT_OK
    while not stopping:
        time.sleep(0.1)
        for i, proc in list(procs.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            if code == EXIT_START and time.monotonic() - started[i] < 10:
                log.error("worker %d could not start; stopping", i)
                status = EXIT_START
                stopping = True
                break
            log.warning("worker %d exited with %s; starting it again", i, code)
            procs[i] = start(i)
            started[i] = time.monotonic()
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_DEADLINE
    for i, proc in procs.items():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in %gs: killing it", i, _STOP_DEADLINE)
            proc.kill()
            proc.wait()
    os.close(watch_fd)
    os.close(lifeline)
    return status
