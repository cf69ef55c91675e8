"""Helpers to run the real ``taskd serve`` as a subprocess on a free port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from taskd.testing import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """``python -m taskd serve`` with the given flags; stderr goes to a log file."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        pass_port: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "taskd", "serve", *args]
        if pass_port:
            argv += ["--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def post(self, path: str, body: dict[str, object]) -> dict[str, Any]:
        """``POST`` JSON to the task API (``path`` under ``/api/v1``): the result."""
        req = urllib.request.Request(
            f"{self.url}/api/v1{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())["result"]
            return result

    def start(self, *, wait: bool = True) -> Service:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        if wait:
            self.wait_up()
        return self

    def wait_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"taskd serve exited {self.proc.returncode}: {self.log()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"taskd serve did not come up: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` unless it already exited; wait and return the exit status."""
        assert self.proc is not None
        try:
            self.proc.wait(0.05)  # exited on its own (e.g. failed to start)?
        except subprocess.TimeoutExpired:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    # In async tests: start and stop in a thread, so that waiting for the server (or
    # for it to exit) never blocks the test's event loop.
    async def __aenter__(self) -> Service:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.__exit__, *exc)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> None:
    """``taskd.testing.eventually`` for a synchronous test (one with no event loop):
    the same poll, run on a loop of its own."""
    asyncio.run(eventually(predicate, timeout, interval))


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the ``name`` samples at ``url``/metrics whose labels include
    ``labels`` (a counter's ``_total`` sample counts as ``name``); 0 if none."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in (name, name + "_total") and labels.items() <= sample.labels.items()
    )


class Lines:
    """The lines a subprocess writes to a pipe, collected by a daemon thread: a test
    waits for one (``wait_for(lambda: len(out.lines) >= 2)``) and never blocks on a
    ``readline`` that might not come."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # closed at the end, as ``communicate`` would
            for line in stream:
                self.lines.append(line)

    def join(self, timeout: float = 10.0) -> list[str]:
        """Wait for the end of the stream (the process exited); the lines read."""
        self._thread.join(timeout)
        return self.lines


def argv(*parts: str | Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in parts:
        out.extend([p] if isinstance(p, str) else p)
    return out
