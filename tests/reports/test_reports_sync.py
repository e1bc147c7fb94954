"""``oscqat report sync``: MLflow that lost writes is backfilled from Ray's result.json files."""

from __future__ import annotations

import shutil
import sqlite3

from reports_testlib import invoke


def _val_top1_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_top1"))


def test_sync_backfills_missing_epochs_and_runs(report_campaign, tmp_path):
    from mlflow.tracking import MlflowClient

    rc = report_campaign
    copy = tmp_path / "mlflow.db"  # damage a copy: the fixture store is shared
    shutil.copy(rc.work / "mlflow.db", copy)
    uri = f"sqlite:///{copy}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(rc.experiment).experiment_id
    trials = client.search_runs([exp], filter_string="tags.`oscqat.role` = 'trial' and tags.`oscqat.stage` = 'search'")
    full = {r.data.tags["oscqat.trial_id"]: _val_top1_steps(client, r.info.run_id) for r in trials}
    partial = next(r for r in trials if len(full[r.data.tags["oscqat.trial_id"]]) == 2)
    lost = next(r for r in trials if r.info.run_id != partial.info.run_id)
    with sqlite3.connect(copy) as con:  # as if the server was down for epoch 2 / the whole trial
        con.execute("delete from metrics where run_uuid = ? and step >= 2", (partial.info.run_id,))
        con.execute("delete from latest_metrics where run_uuid = ?", (partial.info.run_id,))
        for table in ("metrics", "latest_metrics", "params", "tags"):
            con.execute(f"delete from {table} where run_uuid = ?", (lost.info.run_id,))
        con.execute("delete from runs where run_uuid = ?", (lost.info.run_id,))
    assert _val_top1_steps(client, partial.info.run_id) == [1]

    res = invoke("report", "sync", rc.campaign_dir, "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    after = client.search_runs([exp], filter_string="tags.`oscqat.role` = 'trial' and tags.`oscqat.stage` = 'search'")
    assert {r.data.tags["oscqat.trial_id"]: _val_top1_steps(client, r.info.run_id) for r in after} == full
    lost_tid = lost.data.tags["oscqat.trial_id"]
    recreated = next(r for r in after if r.data.tags["oscqat.trial_id"] == lost_tid)
    assert recreated.data.tags["mlflow.parentRunId"] == lost.data.tags["mlflow.parentRunId"]
    assert recreated.data.tags["oscqat.state"] == lost.data.tags["oscqat.state"]
    assert recreated.data.params == lost.data.params  # the trial's full config again
    assert recreated.info.status == lost.info.status
    for key in ("val_top1", "train_loss", "osc_frac", "epoch_time_s"):
        assert recreated.data.metrics[key] == lost.data.metrics[key]
    assert "train_config.yaml" in {a.path for a in client.list_artifacts(recreated.info.run_id)}
    # a second sync finds nothing missing
    res = invoke("report", "sync", rc.campaign_dir, "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    again = client.search_runs([exp], filter_string="tags.`oscqat.role` = 'trial' and tags.`oscqat.stage` = 'search'")
    assert len(again) == len(after)
    assert sum(len(client.get_metric_history(r.info.run_id, "val_top1")) for r in again) == sum(map(len, full.values()))
