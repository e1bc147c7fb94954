"""A trial whose quantizer scale collapses ends as FAIL in Optuna and FAILED in MLflow, with the
reason (naming the layer) on both, exactly like a non-finite loss; the other trial completes."""

from __future__ import annotations

import pytest

import yaml

from searchtest_utils import campaign_dict, write_campaign, write_space


@pytest.mark.timeout(300)
def test_collapsed_quantizer_trial_is_fail_in_optuna_and_failed_in_mlflow(tmp_path, ray_tmp, monkeypatch,
                                                                           fp_checkpoint):
    import optuna
    import ray
    from mlflow.tracking import MlflowClient

    from search.campaign import load_campaign
    from search.runner import run_campaign

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # a private local Ray instance
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # the runner sets it; restore it afterwards
    monkeypatch.chdir(tmp_path)
    points = ["good-lsq", "scale-collapse"]
    mlflow_uri, optuna_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    space = write_space(tmp_path, points)
    spec = yaml.safe_load(space.read_text())
    spec["params"]["quantizer_lr"]["high"] = 0.1  # the collapsing point must be inside the space
    space.write_text(yaml.safe_dump(spec, sort_keys=False))
    data = campaign_dict("qcollapse", space, num_samples=2, max_epochs=1,
                         pretrained=fp_checkpoint, storage_path=str(tmp_path / "ray_results"),
                         optuna_storage=optuna_uri, mlflow={"tracking_uri": mlflow_uri})
    try:
        run_campaign(load_campaign(write_campaign(tmp_path, data)))
    finally:
        ray.shutdown()

    study = optuna.load_study(study_name="qcollapse.demo_net-w4a4", storage=optuna.storages.RDBStorage(optuna_uri))
    by_point = {t.user_attrs.get("starting_point"): t for t in study.get_trials(deepcopy=False)}
    assert set(by_point) == set(points), by_point
    bad, good = by_point["scale-collapse"], by_point["good-lsq"]
    assert bad.state.name == "FAIL" and good.state.name == "COMPLETE"
    reason = bad.user_attrs.get("failure_reason", "")
    assert "collapsed" in reason and "_quantizer (scale -" in reason, reason  # names the layers

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("qcollapse")
    runs = {r.data.tags.get("oscqat.trial_id"): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("oscqat.role") == "trial"}
    child = runs[bad.user_attrs["tune_trial_id"]]
    assert child.info.status == "FAILED" and child.data.tags.get("oscqat.state") == "FAIL"
    assert "collapsed" in child.data.tags.get("oscqat.failure_reason", "")
    assert runs[good.user_attrs["tune_trial_id"]].info.status == "FINISHED"
