"""``report sync`` repairs what an MLflow outage or a driver restart left incomplete, without Ray:
a campaign folder, Ray-style trial results, an Optuna study and an MLflow store are written by hand
as a finished campaign leaves them, with the two defects the red team found."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

pytestmark = pytest.mark.timeout(120)
TID = "abc12345"


def _campaign(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from search.campaign import Campaign
    from search.searcher import TRIAL_ID_ATTR, make_storage
    from search.tracking import ensure_parent_run, get_or_create_experiment

    mlflow_uri, optuna_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    camp = Campaign.model_validate({"name": "syn", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "budget": {"num_samples": 1, "max_epochs": 2, "grace_period": 1},
                                    "storage_path": str(tmp_path / "rr"), "mlflow": {"tracking_uri": mlflow_uri},
                                    "optuna_storage": optuna_uri})
    target = camp.targets[0]
    camp_dir = camp.campaign_dir()
    exp = camp_dir / target.slug
    tdir = exp / f"train_trial_{TID}_1"
    tdir.mkdir(parents=True)
    (camp_dir / "campaign.yaml").write_text(yaml.safe_dump(camp.model_dump(mode="json")))
    (tdir / "params.json").write_text(json.dumps({"lr": 0.05, "method": "lsq"}))
    results = [{"trial_id": TID, "epoch": e, "training_iteration": e, "val_top1": 0.5 + e / 10,
                "layer_osc": json.dumps({"conv1": 0.01 * e})} for e in (1, 2)]
    (tdir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    study = optuna.create_study(study_name=camp.study_name(target), storage=make_storage(optuna_uri),
                                direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 0.01, 0.1)
    trial.set_user_attr(TRIAL_ID_ATTR, TID)
    study.tell(trial, 0.7)
    client = MlflowClient(mlflow_uri)
    exp_id = get_or_create_experiment(client, camp.experiment_name)
    parent = ensure_parent_run(client, exp_id, camp.name, target, {})  # left RUNNING: MLflow was down at the end
    child = client.create_run(exp_id, run_name=TID, tags={"mlflow.parentRunId": parent, "oscqat.role": "trial",
                                                          "oscqat.trial_id": TID, "oscqat.state": "COMPLETE"})
    run_id = child.info.run_id
    art = tmp_path / "art"
    art.mkdir()
    # the driver restarted after epoch 1: its in-memory history held epoch 2 only
    (art / "layer_oscillations.json").write_text(json.dumps([{"epoch": 2, "layers": {"conv1": 0.02}}]))
    (art / "train_config.yaml").write_text("arch: demo_net\n")
    client.log_artifacts(run_id, str(art))
    client.set_terminated(run_id, "FINISHED")
    (camp_dir / "state.json").write_text(json.dumps({"targets": {target.label: {
        "status": "done", "parent_run_id": parent, "experiment_path": str(exp), "experiment_id": exp_id}}}))
    return camp, camp_dir, client, parent, run_id


def test_sync_finishes_the_parent_and_completes_the_oscillation_history(tmp_path, monkeypatch):
    from reports.store import CampaignStore
    from reports.sync import sync_campaign

    monkeypatch.chdir(tmp_path)
    camp, camp_dir, client, parent, run_id = _campaign(tmp_path)
    assert client.get_run(parent).info.status == "RUNNING"
    (summary,) = sync_campaign(CampaignStore(camp_dir, camp))
    run = client.get_run(parent)
    assert summary.parent_finished and run.info.status == "FINISHED"
    assert run.data.metrics["best_val_top1"] == pytest.approx(0.7) and run.data.tags["oscqat.best_trial_id"] == TID
    path = client.download_artifacts(run_id, "layer_oscillations.json", str(tmp_path / "dl"))
    assert [h["epoch"] for h in json.loads(Path(path).read_text())] == [1, 2]
    (again,) = sync_campaign(CampaignStore(camp_dir, camp))  # nothing left to repair
    assert not again.parent_finished and again.artifacts_logged == 0


def test_driver_fills_the_oscillation_history_from_ray_results(tmp_path):
    """After a resume the callback held only post-resume epochs; the trial's result.json has them all."""
    from types import SimpleNamespace

    from search.tracking import complete_osc_history

    lines = [{"epoch": e, "layer_osc": json.dumps({"conv1": 0.01 * e})} for e in (1, 2, 3)]
    (tmp_path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    held = [{"epoch": 3, "layers": {"conv1": 0.03}}]  # what the restarted driver saw
    out = complete_osc_history(SimpleNamespace(path=str(tmp_path)), held)
    assert [h["epoch"] for h in out] == [1, 2, 3] and out[0]["layers"] == {"conv1": 0.01}
    assert complete_osc_history(SimpleNamespace(path="s3://bucket/x"), held) == held  # remote: unchanged


def test_resume_says_when_mlflow_lacks_epochs_ray_recorded(tmp_path, monkeypatch, capsys):
    """A driver killed during an MLflow outage lost its buffered epochs, and nothing said so."""
    from search.runner import _hint_sync, mlflow_missing_epochs

    monkeypatch.chdir(tmp_path)
    camp, camp_dir, client, parent, run_id = _campaign(tmp_path)
    state = json.loads((camp_dir / "state.json").read_text())
    assert mlflow_missing_epochs(camp, state["targets"]["demo_net/w4a4"]) == 2  # the child run has no metrics
    _hint_sync(camp, state)
    assert "run `oscqat report sync syn`" in capsys.readouterr().out
    from reports.store import CampaignStore
    from reports.sync import sync_campaign

    sync_campaign(CampaignStore(camp_dir, camp))
    assert mlflow_missing_epochs(camp, state["targets"]["demo_net/w4a4"]) == 0
    _hint_sync(camp, state)
    assert "report sync" not in capsys.readouterr().out
