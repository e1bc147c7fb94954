"""Driver deaths at the awkward moments, made deterministic (no timing races).

* Killed between creating a trial's MLflow run and logging its params: after the restart the
  callback finds the run by its trial-id tag and must complete its params (not leave it bare,
  not open a second run).
* Killed after the target's Optuna study was created (starting points enqueued) but before Tune
  saved anything: the resume cannot restore the Tuner and starts the target over; the dead run's
  enqueued trials must not linger as WAITING or be handed out in place of the new ones.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from searchtest_utils import campaign_dict, check_records, write_campaign, write_space


@pytest.mark.timeout(120)
def test_callback_completes_params_of_a_run_found_after_restart(tmp_path):
    from mlflow.entities import Metric, Param

    from search.tracking import MlflowTrialCallback, client_for, get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    exp = get_or_create_experiment(client, "restart")
    parent = client.create_run(exp, tags={"oscqat.role": "parent"}).info.run_id
    # what a driver killed right after create_run leaves: the run, one param of a first batch, epoch 1
    child = client.create_run(exp, run_name="t1", tags={"mlflow.parentRunId": parent, "oscqat.role": "trial",
                                                        "oscqat.trial_id": "t1"}).info.run_id
    client.log_batch(child, params=[Param("arch", "demo_net")], metrics=[Metric("val_top1", 0.5, 0, 1)])

    base = {"arch": "demo_net", "bits": "w4a4", "batch_size": 128}
    callback = MlflowTrialCallback(uri, exp, parent, "restart", "demo_net/w4a4", base, 2, "restart.study")
    callback = pickle.loads(pickle.dumps(callback))  # as Tuner.restore brings it back
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.03, "method": "lsq"}, last_result={})

    callback.on_trial_restore(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {"epoch": 1, "training_iteration": 1, "val_top1": 0.9})  # redone
    callback.on_trial_result(0, [trial], trial, {"epoch": 2, "training_iteration": 2, "val_top1": 0.95})
    assert callback.flush()

    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in runs] == [child]  # no second run for the trial
    # the trial's identity and what the search chose (the fixed base is on the parent run)
    assert runs[0].data.params == {"arch": "demo_net", "bits": "w4a4", "lr": "0.03", "method": "lsq"}
    assert [(m.step, m.value) for m in client.get_metric_history(child, "val_top1")] == [(1, 0.5), (2, 0.95)]


class _DriverDied(BaseException):
    """Stands in for SIGKILL: nothing after it runs, and no except clause catches it."""


@pytest.mark.timeout(300)
def test_resume_when_the_driver_died_before_tune_saved_anything(tmp_path, ray_tmp, monkeypatch, fp_checkpoint):
    import ray
    from ray import tune

    from search.campaign import load_campaign
    from search.runner import read_state, resume_campaign, run_campaign

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # a private local Ray instance
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # the runner sets it; restore it afterwards
    monkeypatch.chdir(tmp_path)
    points = ["good-lsq", "good-dampen"]
    data = campaign_dict("restart", write_space(tmp_path, points), num_samples=2, max_epochs=1,
                         pretrained=fp_checkpoint, storage_path=str(tmp_path / "ray_results"),
                         optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                         mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    campaign = load_campaign(write_campaign(tmp_path, data))

    def dies(self, *args, **kwargs):
        raise _DriverDied()

    try:
        with monkeypatch.context() as m:  # the driver dies as the Tuner is being made
            m.setattr(tune.Tuner, "__init__", dies)
            with pytest.raises(_DriverDied):
                run_campaign(campaign)
        campaign_dir = tmp_path / "ray_results" / "restart"
        assert read_state(campaign_dir)["targets"]["demo_net/w4a4"]["status"] == "running"
        assert not tune.Tuner.can_restore(str(campaign_dir / "demo_net-w4a4"))

        results = resume_campaign(str(campaign_dir))
    finally:
        ray.shutdown()

    assert read_state(campaign_dir)["targets"]["demo_net/w4a4"]["status"] == "done"
    assert results[0].best_trial_id is not None
    recs = check_records(f"sqlite:///{tmp_path / 'mlflow.db'}", "restart", f"sqlite:///{tmp_path / 'optuna.db'}",
                         "restart", {"demo_net/w4a4": "restart.demo_net-w4a4"}, 1, 2,
                         orphans={"demo_net/w4a4": len(points)})  # the dead run's enqueued points
    rec = recs["demo_net/w4a4"]
    # each starting point ran exactly once, under its own name
    labels = sorted(t.user_attrs.get("starting_point") for t in rec.trials.values())
    assert labels == sorted(points), labels
    for trial in rec.trials.values():
        assert trial.params["method"] == {"good-lsq": "lsq", "good-dampen": "dampen"}[trial.user_attrs["starting_point"]]
