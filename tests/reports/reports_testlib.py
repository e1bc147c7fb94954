"""Small helpers of the report tests: the CLI in-process, processes by PID, free ports."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from typer.testing import CliRunner


def invoke(*args: str, env: dict | None = None):
    """Run ``oscqat ARGS`` in-process (the root CLI, as the console script does)."""
    from oscqat_cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def pids_using(fragment: str) -> list[int]:
    """PIDs whose command line mentions ``fragment`` (e.g. our private Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
