"""A campaign against a real ``mlflow server`` and a real two-node Ray cluster on this machine.

The driver is this process (``search.runner.run_campaign(campaign, address=cluster.address)``);
both Ray nodes have one CPU, so the two first trials run on different nodes. Nodes on one machine
share the IP, so they are told apart by node id and a custom resource each. One trial is made to
diverge (the trainable's fault hook), so all three trial states (COMPLETE, PRUNED, FAIL) go through
the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from searchtest_utils import (campaign_dict, check_records, free_port, kill_session, trial_node_ids, write_campaign)

NAME = "cluster"
MAX_EPOCHS = 2
NUM_SAMPLES = 3  # good-lsq and good-dampen side by side (one per node), then collapse (pruned)
# good-dampen's 2nd epoch diverges: a FAIL trial (reported once, not retried); the first two trials
# meet before their first epoch (search/faults.py barrier), so they certainly run at the same time,
# which on two 1-CPU nodes means one on each: placement no longer depends on actor start-up timing
FAULT = "nan@2:method=dampen,barrier@1"
OBJECT_STORE = 100 * 1024 * 1024


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend, started without waiting for it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "mlflow_server.log"
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{directory / 'srv.db'}",
               "--default-artifact-root", str(directory / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=directory)

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        kill_session(self.proc.pid)  # the server and its worker: its own process group, by PID
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Started first (session scope, listed before the FP checkpoint) so that it boots while the FP
    checkpoint and the Ray cluster are made; the test waits for /health before using it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def two_node_cluster(ray_tmp, monkeypatch):
    """Head + one added node, one CPU each, told apart by a custom resource."""
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # our own ray_current_cluster file and sessions
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # the runner sets it; restore it afterwards
    monkeypatch.setenv("OSCQAT_FAULT_INJECT", FAULT)  # the nodes' workers inherit it
    monkeypatch.setenv("OSCQAT_FAULT_BARRIER", f"{ray_tmp / 'barrier'}:2")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"oq_head": 1}, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"oq_worker": 1}, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(420)
def test_campaign_on_two_nodes_with_mlflow_server(mlflow_server, fp_checkpoint, two_node_cluster, tmp_path,
                                                 monkeypatch, space_file):
    import ray

    from search.campaign import load_campaign
    from search.runner import run_campaign

    server_url = mlflow_server.wait_ready()

    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(key, os.environ.get(key, value))  # client_for may set these: restore afterwards
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    data = campaign_dict(NAME, space_file, num_samples=NUM_SAMPLES, max_epochs=MAX_EPOCHS, pretrained=fp_checkpoint,
                         storage_path=str(tmp_path / "ray_results"), optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                         mlflow={"tracking_uri": server_url})
    campaign = load_campaign(write_campaign(tmp_path, data))

    results = run_campaign(campaign, address=two_node_cluster.address)

    # which node is which, from the custom resources
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    head = [nid for nid, res in nodes.items() if "oq_head" in res]
    worker = [nid for nid, res in nodes.items() if "oq_worker" in res]
    assert len(head) == 1 and len(worker) == 1 and len(nodes) == 2, nodes

    # the runs went to the server (and nothing to a local sqlite store)
    recs = check_records(server_url, NAME, f"sqlite:///{tmp_path / 'optuna.db'}", NAME,
                         {"demo_net/w4a4": f"{NAME}.demo_net-w4a4"}, MAX_EPOCHS, NUM_SAMPLES)
    rec = recs["demo_net/w4a4"]
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    assert (mlflow_server.directory / "artifacts").is_dir()
    by_point = {t.user_attrs.get("starting_point"): tid for tid, t in rec.trials.items()}
    assert rec.trials[by_point["collapse"]].state.name == "PRUNED"
    assert rec.trials[by_point["good-lsq"]].state.name == "COMPLETE"
    # the diverged trial: FAIL in Optuna, FAILED in MLflow, its one good epoch kept, the reason on both
    failed = by_point["good-dampen"]
    assert rec.trials[failed].state.name == "FAIL" and rec.children[failed].info.status == "FAILED"
    assert rec.epochs(failed) == 1
    assert "non-finite" in rec.trials[failed].user_attrs.get("failure_reason", "").lower()
    assert "non-finite" in rec.children[failed].data.tags.get("oscqat.failure_reason", "").lower()

    # trials ran on both nodes
    placed = trial_node_ids(tmp_path / "ray_results" / NAME / "demo_net-w4a4")
    assert set(placed) == set(rec.trials), (placed, list(rec.trials))
    placed = {tid: ids - {None} for tid, ids in placed.items()}  # a failure report carries no node id
    assert all(len(ids) == 1 for ids in placed.values()), placed
    used = set().union(*placed.values())
    assert used == {head[0], worker[0]}, (used, nodes)

    # the best config is what run_campaign returns and what the parent run says
    best = max((t for t in rec.trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert [r.target for r in results] == ["demo_net/w4a4"]
    assert results[0].best_trial_id == best.user_attrs["tune_trial_id"]
    assert results[0].best_val_top1 == pytest.approx(best.value)
    assert rec.parent.data.tags["oscqat.fp_checkpoint"] == str(fp_checkpoint)
