"""A real browser on a real ``mlflow server`` over the fixture campaign's store.

Headless Chromium renders the MLflow UI (a JavaScript app) and the test reads the resulting DOM:
the parent run of each target and every trial's child run must be on the page. MLflow shows
child runs collapsed under their parent by default, so the page is a saved view grouping runs by
``tag.mlflow.parentRunId`` with every group expanded (see DESIGN.md's MLflow pitfalls).
Set OSCQAT_UPDATE_SCREENSHOT=1 to refresh docs/mlflow_ui.png (it is written when missing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reports_testlib import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC_SCREENSHOT = ROOT / "docs" / "mlflow_ui.png"
VIEW_KEY = "oscqat-trials"


def _chromium() -> str:
    """Chromium's path, installed with apt-get (about a minute) when missing; else skip, saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get install chromium timed out")
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"apt-get install chromium failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return found


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout}s")


def _render(chromium: str, url: str, screenshot: Path) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--window-size=1600,1000",
           "--virtual-time-budget=15000", f"--screenshot={screenshot}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_mlflow_ui_shows_parent_and_child_runs(report_campaign, tmp_path):
    chromium = _chromium()
    rc = report_campaign
    client = rc.client()
    exp_id = client.get_experiment_by_name(rc.experiment).experiment_id
    parents = client.search_runs([exp_id], filter_string="tags.`oscqat.role` = 'parent'")
    trials = client.search_runs([exp_id], filter_string="tags.`oscqat.role` = 'trial' and tags.`oscqat.stage` = 'search'")
    confirms = client.search_runs([exp_id], filter_string="tags.`oscqat.stage` = 'confirm'")
    assert len(parents) == 2 and len(trials) == 6 and len(confirms) == 2 * 2 * 2  # top 2 x 2 seeds per target
    # a saved view: runs grouped by parent run, every parent's group expanded
    group = {"mode": "tag", "groupByData": "mlflow.parentRunId"}
    expanded = {f"tag.mlflow.parentRunId.{p.info.run_id}": True for p in parents}
    view = {"groupBy": {"aggregateFunction": "average", "groupByKeys": [group]}, "groupsExpanded": expanded,
            "selectedColumns": ["metrics.`val_top1`", "params.`method`", "tags.`oscqat.state`", "tags.`oscqat.role`"]}
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "mlflow_server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", rc.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=rc.work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, server)
        # the experiment's runs page as it opens: the parent runs (children collapsed under them)
        dom = _render(chromium, f"{url}/#/experiments/{exp_id}/runs", tmp_path / "default.png")
        assert "matching runs" in dom, "the runs table did not render"
        for parent in parents:
            assert parent.info.run_name in dom, f"parent run {parent.info.run_name} not shown"
        # the saved view: each parent's group header, then exactly its own trials, in DOM order
        shot = tmp_path / "mlflow_ui.png"
        dom = _render(chromium, f"{url}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}", shot)
        headers = {p.info.run_id: dom.find(f"Group: {p.info.run_id}") for p in parents}
        assert all(pos >= 0 for pos in headers.values()), "a parent's group is not shown"
        bounds = sorted(headers.values()) + [len(dom)]
        for trial in trials + confirms:  # search trials and confirm runs alike sit under their target
            pos = dom.find(f">{trial.info.run_name}<")
            assert pos >= 0, f"child run {trial.info.run_name} not shown"
            start = headers[trial.data.tags["mlflow.parentRunId"]]
            end = min(b for b in bounds if b > start)
            assert start < pos < end, f"child run {trial.info.run_name} is not under its parent's group"
        for state in {t.data.tags["oscqat.state"] for t in trials}:
            assert state in dom
        assert shot.is_file() and shot.stat().st_size > 20_000
        if os.environ.get("OSCQAT_UPDATE_SCREENSHOT") == "1" or not DOC_SCREENSHOT.exists():
            DOC_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copy(shot, DOC_SCREENSHOT)
    finally:
        try:  # the server and its uvicorn worker share the session we started: stop them by group id
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
