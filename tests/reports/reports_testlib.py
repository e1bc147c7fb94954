"""Small helpers of the report tests: the CLI in-process, processes by PID, free ports."""

from __future__ import annotations

import socket

from proc_utils import kill_pids, pids_using  # noqa: F401 - re-exported
from typer.testing import CliRunner


def invoke(*args: str, env: dict | None = None):
    """Run ``oscqat ARGS`` in-process (the root CLI, as the console script does)."""
    from oscqat_cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
