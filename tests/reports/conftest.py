"""One real campaign, run once per session and shared (read-only) by every report test.

Two targets (demo_net w3a3 and w4a4) x 3 trials (the space's lsq, dampen and freeze starting
points) x up to 2 epochs with ASHA: real Ray Tune, Optuna and MLflow (sqlite) in a tmp dir.
Tests that write (export, html, final training) write only what those commands add; tests that
need to damage the store (sync) work on a copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from reports_testlib import kill_pids, pids_using

CAMPAIGN = "reptest"


@dataclass(frozen=True)
class ReportCampaign:
    work: Path
    campaign_dir: Path
    tracking_uri: str
    optuna_storage: str
    experiment: str
    fp_checkpoint: Path

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


@pytest.fixture(scope="session")
def report_campaign(tmp_path_factory) -> ReportCampaign:
    import ray

    from search.campaign import Campaign
    from search.runner import run_campaign

    work = tmp_path_factory.mktemp("report_campaign")
    ray_tmp = Path(tempfile.mkdtemp(prefix="oqr", dir="/tmp"))  # private: never attach to someone else's Ray
    saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    old_cwd = Path.cwd()
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    os.environ.pop("RAY_ADDRESS", None)
    os.chdir(work)  # MLflow's default artifact root (./mlruns) lands in the tmp dir
    fp = make_fp_checkpoint(work / "fp_demo_net.pt")
    campaign = Campaign.model_validate({
        "name": CAMPAIGN, "dataset": "digits",
        "targets": [{"arch": "demo_net", "bits": "w3a3", "pretrained": str(fp)},
                    {"arch": "demo_net", "bits": "w4a4", "pretrained": str(fp)}],
        "base": {"bn_reestimate_batches": 2, "batch_size": 128, "scale_init": "minmax"},
        "budget": {"num_samples": 3, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2,
                   "allow_early_rungs": True},
        "confirm": {"top_k": 2, "seeds": 2},
        "resources": {"cpu": 1, "gpu": 0}, "seed": 0,
        "storage_path": str(work / "ray_results"),
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        "optuna_storage": f"sqlite:///{work / 'optuna.db'}",
    })
    try:
        run_campaign(campaign)
    finally:
        ray.shutdown()
        os.chdir(old_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        kill_pids(pids_using(str(ray_tmp)))  # Ray helpers that outlived shutdown, by PID
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return ReportCampaign(work, campaign.campaign_dir(), campaign.mlflow.tracking_uri, campaign.optuna_storage,
                          campaign.experiment_name, fp)


def make_fp_checkpoint(path: Path) -> Path:
    """The shared FP checkpoint, trained in-process (1 epoch): saves a Ray worker start per session."""
    import torch

    from oscqat.config import TrainConfig
    from oscqat.trainer import Trainer

    cfg = TrainConfig(arch="demo_net", bits="fp32", dataset="digits", epochs=1, lr=0.05, weight_decay=5e-4,
                      batch_size=128, bn_reestimate_batches=0, device="cpu", seed=0)
    trainer = Trainer(cfg)
    trainer.fit()
    torch.save(trainer.model.state_dict(), path)
    return path
