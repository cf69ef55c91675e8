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
