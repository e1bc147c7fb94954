"""The reliability suite's one shared campaign (session scope: Ray and MLflow start once).

``fault_campaign`` runs ``oscqat search run`` as a real subprocess against a real ``mlflow server``
whose URI carries credentials, with four trials (the four starting points of the demo_net w3a3
space, one per ``method``) and one injected fault per method:

    method=lsq            raise@2  -> RuntimeError once epoch 2 (the last) has trained: retried from the
                                      epoch-1 checkpoint
    method=dampen         kill@2   -> SIGKILL of the trial process at the same point: retried likewise
    method=freeze         nan@2    -> NaN weights before epoch 2: non-finite loss, stops with a reason
    method=dampen+freeze  (none)   -> a normal trial

While the campaign runs, the fixture stops the MLflow server (SIGTERM to the process group it
started) once the first epoch has reached MLflow, keeps it down while trials report more epochs,
and restarts it on the same port. Every test in test_campaign_faults.py reads what this left in
Ray's trial folders, MLflow and Optuna.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .helpers import (OSCQAT, TINY_BASE, MlflowServer, clean_env, count_mlflow_metric_rows, count_reported_epochs,
                      read_results, trial_dirs)

CAMPAIGN = "faults"
TARGET_SLUG = "demo_net-w3a3"
MAX_EPOCHS = 2
CHECKPOINTS_TO_KEEP = 1
FAULTS = "raise@2:method=lsq,kill@2:method=dampen,nan@2:method=freeze"
TRACKING_SECRET = "TrackPw-9f3c1e"  # password inside the tracking URI
DATA_SECRET = "DataKey-5b7d2a"  # a base value with credentials is refused up front (test_secrets_everywhere.py)


@dataclass
class TrialInfo:
    trial_id: str
    method: str
    path: Path
    results: list[dict]

    @property
    def epochs_reported(self) -> list[int]:
        """Epochs that trained and were reported (not the failure report of a diverged trial)."""
        return [int(r["epoch"]) for r in self.results if not r.get("failure_reason")]

    @property
    def error_text(self) -> str:
        f = self.path / "error.txt"
        return f.read_text(errors="replace") if f.is_file() else ""


@dataclass
class CampaignRun:
    work: Path
    server: MlflowServer
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    outage: dict
    trials: dict[str, TrialInfo] = field(default_factory=dict)  # by method

    @property
    def exp_path(self) -> Path:
        return self.work / "ray_results" / CAMPAIGN / TARGET_SLUG

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.server.url)

    def child_runs(self) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(CAMPAIGN)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        return [r for r in runs if r.data.tags.get("oscqat.role") == "trial"]

    def study(self):
        import optuna

        from search.searcher import make_storage

        return optuna.load_study(study_name=f"{CAMPAIGN}.{TARGET_SLUG}",
                                 storage=make_storage(f"sqlite:///{self.work / 'optuna.db'}"))


def _wait(cond, timeout_s: float, proc, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll_s)
    return False


def _fp_checkpoint(path: Path) -> Path:
    """A (1-epoch) float demo_net checkpoint for the campaign's target to start from."""
    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    cfg = TrainConfig(arch="demo_net", bits="fp32", dataset="digits", epochs=1, batch_size=128, lr=0.05,
                      bn_reestimate_batches=0, device="cpu")
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.save_model(path)


@pytest.fixture(scope="session")
def fault_campaign(tmp_path_factory) -> CampaignRun:
    import subprocess

    root = tmp_path_factory.mktemp("fault_campaign")
    work = root / "work"
    work.mkdir()
    server = MlflowServer(root / "server")
    server.start()
    fp_path = _fp_checkpoint(root / "fp_demo_net.pt")  # made here, not by a Ray task: saves a worker start
    campaign = {
        "name": CAMPAIGN,
        "dataset": "digits",
        "targets": [{"arch": "demo_net", "bits": "w3a3", "pretrained": str(fp_path)}],  # 4 starting points
        "base": {**TINY_BASE, "data_dir": "s3://bucket/digits"},  # a URI, not a local path (never resolved)
        "budget": {"num_samples": 4, "max_epochs": MAX_EPOCHS, "grace_period": MAX_EPOCHS},  # ASHA never stops
        "confirm": None,
        "resources": {"cpu": 1},
        "checkpoints_to_keep": CHECKPOINTS_TO_KEEP,
        "checkpoint_interval_s": 0,  # every epoch: retries restore from the latest one
        "max_failures": 2,
        "mlflow": {"tracking_uri": f"http://oscqat-user:{TRACKING_SECRET}@127.0.0.1:{server.port}"},
        "optuna_storage": "sqlite:///optuna.db",
    }
    (work / "campaign.yaml").write_text(yaml.safe_dump(campaign, sort_keys=False))
    exp_path = work / "ray_results" / CAMPAIGN / TARGET_SLUG
    outage: dict = {}
    t0 = time.monotonic()
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:
        proc = subprocess.Popen([OSCQAT, "search", "run", "campaign.yaml"], cwd=work, stdout=out, stderr=err,
                                env=clean_env(OSCQAT_FAULT_INJECT=FAULTS))
        try:
            # 1. first epoch in MLflow -> stop the server
            if _wait(lambda: count_mlflow_metric_rows(server.db) >= 1, 400, proc):
                outage["metric_rows_at_stop"] = count_mlflow_metric_rows(server.db)
                outage["epochs_at_stop"] = count_reported_epochs(exp_path)
                server.stop()
                outage["stopped_at_s"] = time.monotonic() - t0
                # 2. trials go on: wait for more epochs to be reported while MLflow is down, and
                # for the callback to give up on a write (its client retries for a few seconds, so
                # with fast epochs a restart could otherwise land inside those retries)
                stderr_path = root / "stderr.txt"
                _wait(lambda: count_reported_epochs(exp_path) >= outage["epochs_at_stop"] + 2
                      and "buffered" in stderr_path.read_text(errors="replace"), 150, proc)
                outage["epochs_at_restart"] = count_reported_epochs(exp_path)
                outage["campaign_alive_at_restart"] = proc.poll() is None
                outage["metric_rows_while_down"] = count_mlflow_metric_rows(server.db)
                # 3. restart on the same port, same backend store
                server.start()
                outage["restarted_at_s"] = time.monotonic() - t0
            proc.wait(timeout=500)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = CampaignRun(work=work, server=server, returncode=proc.returncode,
                      stdout=(root / "stdout.txt").read_text(errors="replace"),
                      stderr=(root / "stderr.txt").read_text(errors="replace"),
                      wall_s=time.monotonic() - t0, outage=outage)
    import json

    for d in trial_dirs(exp_path):
        params = json.loads((d / "params.json").read_text())
        results = read_results(d / "result.json") if (d / "result.json").is_file() else []
        trial_id = results[0]["trial_id"] if results else d.name.split("_")[2]
        run.trials[params["method"]] = TrialInfo(trial_id, params["method"], d, results)
    try:
        yield run
    finally:
        server.stop()
