"""200,000 tasks through a 10,000 cap: memory stays bounded, no active task evicted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_memory_is_bounded_by_the_cap() -> None:
    probe = Path(__file__).with_name("memory_probe.py")
    small = subprocess.run(
        [sys.executable, str(probe), "20000", "10000"], capture_output=True, text=True, timeout=300
    )
    big = subprocess.run(
        [sys.executable, str(probe), "200000", "10000"], capture_output=True, text=True, timeout=300
    )
    assert small.returncode == 0 and big.returncode == 0, small.stderr + big.stderr
    s, b = json.loads(small.stdout), json.loads(big.stdout)
    print(f"\n20k tasks: peak RSS {s['peak_rss_mib']} MiB; 200k tasks: {b['peak_rss_mib']} MiB")
    assert b["tasks"] >= 199_000 and b["records_at_end"] == 10_000
    assert b["active_survived"] and s["active_survived"]
    # ten times the tasks through the same cap: memory does not grow with the count
    assert b["peak_rss_mib"] < s["peak_rss_mib"] * 1.25 + 10
    assert b["peak_rss_mib"] < 250


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_large_results_stay_compact_and_deleted_ones_are_freed(tmp_path: Path) -> None:
    """A 1 MiB `[[],[],…]` result parses into ~25 MiB of Python objects; taskd keeps
    the text instead (docs/reliability.md), lists such records without stalling, and
    frees what is deleted, render cache included."""
    import threading
    import time
    import urllib.request

    from ..service import Service
    from ..test_serve import http

    nested = b'{"result":[' + b",".join([b"[]"] * 349_000) + b"]}"
    assert len(nested) < 1024 * 1024

    def complete(url: str, body: bytes) -> str:
        tid = http("POST", url + "/api/v1/tasks", {"task_type": "big"})[1]["result"]["task_id"]
        http("POST", f"{url}/api/v1/tasks/{tid}/start")
        req = urllib.request.Request(f"{url}/api/v1/tasks/{tid}/complete", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        return tid

    with Service(tmp_path, "--log-level", "WARNING") as s:
        assert s.proc is not None
        start = _rss_mib(s.proc.pid)
        ids = [complete(s.url, nested) for _ in range(30)]
        grown = _rss_mib(s.proc.pid) - start
        # listing them while /health is polled: the loop is never stalled for long
        worst = [0.0]
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                urllib.request.urlopen(s.url + "/health", timeout=10).read()
                worst[0] = max(worst[0], time.monotonic() - t0)

        prober = threading.Thread(target=probe)
        prober.start()
        # read raw: parsing 30 such results here would hold the GIL and stall the probe
        with urllib.request.urlopen(s.url + "/api/v1/tasks?limit=30", timeout=60) as resp:
            raw = resp.read()
        done.set()
        prober.join()
        body = json.loads(raw)
        assert len(body["result"]) == 30
        assert body["result"][0]["result"][:2] == [[], []]
        for tid in ids:
            assert http("DELETE", f"{s.url}/api/v1/tasks/{tid}")[0] == 204
        smaller = b'{"result":[' + b",".join([b"[]"] * 300_000) + b"]}"
        for _ in range(100):
            tid = complete(s.url, smaller)
            http("GET", f"{s.url}/api/v1/tasks/{tid}")  # rendered, so cached
            assert http("DELETE", f"{s.url}/api/v1/tasks/{tid}")[0] == 204
        after = _rss_mib(s.proc.pid) - start
    print(
        f"\n30 results: +{grown:.0f} MiB; health worst {worst[0] * 1000:.0f} ms; end +{after:.0f}"
    )
    assert grown < 200
    assert worst[0] < 1.0
    assert after < 250
