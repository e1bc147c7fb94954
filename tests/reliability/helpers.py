"""Shared helpers of the reliability suite: a real ``mlflow server`` we start and stop by PID,
the ``oscqat`` console script as a subprocess, and readers for what Ray and MLflow stored."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OSCQAT = str(BIN / "oscqat")
MLFLOW = str(BIN / "mlflow")

# Small enough for 2 shared CPU cores (see DESIGN.md: tests use tiny data and finish fast).
TINY_BASE = {"bn_reestimate_batches": 2, "batch_size": 128, "device": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The test process's environment without anything that would join someone else's Ray cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "OSCQAT_FAULT"))}
    env.update(extra)
    return env


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend; stopped and restarted by its own PID."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db = self.root / "mlflow.db"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {log.name}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s; see {log.name}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the server's process group (it is the leader: we started it in its own session)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        # uvicorn workers of this group may linger a moment after the leader exits
        for _ in range(40):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([OSCQAT, *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_results(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trial_dirs(exp_path: Path) -> list[Path]:
    return sorted(p for p in exp_path.iterdir() if p.is_dir() and (p / "params.json").is_file()) \
        if exp_path.is_dir() else []


def count_reported_epochs(exp_path: Path) -> int:
    return sum(len(read_results(d / "result.json")) for d in trial_dirs(exp_path) if (d / "result.json").is_file())


def count_mlflow_metric_rows(db: Path, key: str = "val_top1") -> int:
    """Rows of one metric in the server's backend store, read directly (works while it is down)."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("select count(*) from metrics where key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def no_traceback(text: str) -> bool:
    return "Traceback" not in text
