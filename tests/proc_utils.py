"""Finding and killing this test run's leftover processes (Ray helpers) by command line."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def pids_using(path_fragment: str) -> list[int]:
    """PIDs whose command line mentions ``path_fragment`` (our private Ray temp dir: our Ray processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path_fragment in cmdline:
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
