"""``oscqat ui CAMPAIGN``: the MLflow UI and optuna-dashboard for one campaign's stores, on 127.0.0.1.

Both servers get free ports, their URLs open the campaign's experiment (its saved view when there
is one) and the first target's study; Ctrl-C stops both. A store on a server (an ``http(s)``
tracking URI) is not started again: its URL is printed as it is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from reports.store import CampaignStore
from search.searcher import redact
from search.tracking import VIEW_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str  # the page to open
    health: str  # polled until it answers
    argv: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: object = None


def _bin(name: str) -> str:
    """The tool next to this Python (the venv's), so ``oscqat ui`` works without an activated venv."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def mlflow_server(store: CampaignStore, port: int) -> Server | None:
    uri = store.tracking_uri
    view = store.client.get_experiment(store.experiment_id).tags.get(f"mlflow.sharedViewState.{VIEW_KEY}")
    # workflowType: the UI's global GenAI / model-training switch defaults to GenAI for a new browser
    page = f"#/experiments/{store.experiment_id}/runs?workflowType=machine_learning" + (
        f"&viewStateShareKey={VIEW_KEY}" if view else "")
    if uri.startswith(("http://", "https://")):
        return Server("MLflow", f"{redact(uri).rstrip('/')}/{page}", "")
    base = f"http://127.0.0.1:{port}"
    return Server("MLflow", f"{base}/{page}", f"{base}/health",
                  [_bin("mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"],
                  {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # the job runner costs ~2.5 GiB and 20 s


def dashboard_server(store: CampaignStore, port: int) -> Server:
    storage = store.optuna_storage
    arg = storage.removeprefix("journal:///") if storage.startswith("journal:///") else storage
    base = f"http://127.0.0.1:{port}"
    page = f"{base}/dashboard"
    study = store.study(store.targets[0]) if store.targets else None
    if study is not None:
        page += f"/studies/{study._study_id}"
    return Server("Optuna dashboard", page, base + "/api/meta",
                  [_bin("optuna-dashboard"), arg, "--host", "127.0.0.1", "--port", str(port)])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _stop(servers: list[Server]) -> None:
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGTERM)
    for s in servers:
        if s.proc is not None:
            try:
                s.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(s.proc.pid, signal.SIGKILL)


def serve(store: CampaignStore, echo=print, startup_timeout_s: float = 90.0) -> int:
    """Start the servers, print their URLs, block until Ctrl-C (exit 0) or a server dies (exit 1)."""
    def _interrupt(signum, frame):  # SIGTERM/SIGHUP (a closed terminal, `timeout`) stop both like Ctrl-C
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    servers = [s for s in (mlflow_server(store, free_port()), dashboard_server(store, free_port())) if s]
    started = [s for s in servers if s.argv]
    try:
        for s in started:  # output to a file, not a pipe nobody drains (a full pipe would block the server)
            s.log = tempfile.TemporaryFile()
            s.proc = subprocess.Popen(s.argv, env={**os.environ, **s.env}, stdout=s.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + startup_timeout_s
        waiting = list(started)
        while waiting:
            for s in list(waiting):
                if s.proc.poll() is not None:
                    s.log.seek(0)
                    err = s.log.read().decode(errors="replace").strip().splitlines()[-3:]
                    echo(f"error: {s.name} exited ({s.proc.returncode}): {' / '.join(err) or 'no output'}")
                    return 1
                if _answers(s.health):
                    waiting.remove(s)
            if waiting and time.monotonic() > deadline:
                echo(f"error: {', '.join(s.name for s in waiting)} did not answer within {startup_timeout_s:.0f} s")
                return 1
            time.sleep(0.5)
        width = max(len(s.name) for s in servers) + 1
        for s in servers:
            echo(f"{(s.name + ':').ljust(width)} {s.url}")
        echo("Ctrl-C stops " + ("both" if len(started) == 2 else "it"))
        while True:
            for s in started:
                if s.proc.poll() is not None:
                    echo(f"error: {s.name} stopped ({s.proc.returncode})")
                    return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(started)
