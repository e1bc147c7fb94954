"""Small helpers shared by the benchmark scripts (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import platform
import sys
from datetime import datetime
from pathlib import Path


def say(msg: str) -> None:
    """A timestamped progress line on the real stdout (Ray may redirect sys.stdout)."""
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.__stdout__, flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
