"""``oscqat report compare`` on the fixture campaign: every format, checked against Optuna and MLflow."""

from __future__ import annotations

import csv
import io
import json

import optuna
import pytest

from reports_testlib import free_port, invoke


def _optuna_trials(rc, slug: str):
    study = optuna.load_study(study_name=f"reptest.{slug}", storage=rc.optuna_storage)
    return study.get_trials(deepcopy=False)


def test_compare_json_matches_optuna_and_mlflow(report_campaign):
    rc = report_campaign
    res = invoke("report", "compare", rc.campaign_dir, "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["target"] for r in rows] == ["demo_net/w3a3", "demo_net/w4a4"]
    client = rc.client()
    for row in rows:
        for key in ("target", "best_val_top1", "best_trial_id", "method", "params", "osc_frac", "frozen_frac",
                    "trials_complete", "trials_pruned", "trials_failed", "trial_epochs", "wall_time_s"):
            assert key in row
        trials = _optuna_trials(rc, row["target"].replace("/", "-"))
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        assert complete, "ASHA always lets the first trial at a rung go on: there is a COMPLETE trial"
        best = max(complete, key=lambda t: t.value)  # first max in search order, as Optuna's best_trial
        assert row["best_val_top1"] == best.value
        assert row["best_trial_id"] == best.user_attrs["tune_trial_id"]
        assert row["method"] == best.params["method"]
        assert row["params"] == {k: v for k, v in best.params.items() if k not in ("method", "dampen_aggregation")}
        counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
        assert (row["trials_complete"], row["trials_pruned"], row["trials_failed"]) == (
            counts["COMPLETE"], counts["PRUNED"], counts["FAIL"])
        assert row["trials_complete"] + row["trials_pruned"] + row["trials_failed"] == 3
        # compute: one trial-epoch per reported epoch; wall = sum of every epoch_time_s logged
        assert row["trial_epochs"] == sum(len(t.intermediate_values) for t in trials)
        runs = client.search_runs([client.get_experiment_by_name(rc.experiment).experiment_id],
                                  filter_string=f"tags.`oscqat.target` = '{row['target']}' and "
                                                f"tags.`oscqat.role` = 'trial' and tags.`oscqat.stage` = 'search'")
        wall = sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_time_s"))
        assert row["wall_time_s"] == pytest.approx(wall, abs=1e-3) and wall > 0
        best_run = next(r for r in runs if r.data.tags["oscqat.trial_id"] == row["best_trial_id"])
        assert row["osc_frac"] == best_run.data.metrics["osc_frac"]
        assert row["frozen_frac"] == best_run.data.metrics["frozen_frac"]
        # best plain LSQ vs best dampen/freeze
        by_method = {}
        for t in complete:
            by_method.setdefault(t.params["method"], []).append(t.value)
        assert row["best_lsq_val_top1"] == (max(by_method["lsq"]) if "lsq" in by_method else None)
        remedies = [v for m, vs in by_method.items() if m != "lsq" for v in vs]
        assert row["best_remedy_val_top1"] == (max(remedies) if remedies else None)


def test_compare_other_formats(report_campaign):
    rc = report_campaign
    res = invoke("report", "compare", rc.campaign_dir, "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["target"] for r in rows] == ["demo_net/w3a3", "demo_net/w4a4"]
    assert all(r["best_trial_id"] and float(r["best_val_top1"]) > 0.5 for r in rows)
    json.loads(rows[0]["params"])
    res = invoke("report", "compare", rc.campaign_dir, "--format", "markdown")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("| target |") and lines[2].startswith("| demo_net/w3a3 |")
    assert lines[4] == "" and "selected on val_top1" in lines[5] and len(lines) == 6  # which split chose, which is shown
    res = invoke("report", "compare", rc.campaign_dir)  # rich table (wide terminal)
    assert res.exit_code == 0, res.output
    assert "demo_net/w3a3" in res.stdout and "best dampen/" in res.stdout
    res = invoke("report", "compare", rc.campaign_dir, env={"COLUMNS": "80"})  # narrow: one card per target
    assert res.exit_code == 0 and "complete/pruned/failed" in res.stdout


def test_compare_user_and_backend_errors(report_campaign, tmp_path):
    rc = report_campaign
    res = invoke("report", "compare", rc.campaign_dir, "--format", "xml")
    assert res.exit_code == 2 and "--format" in res.output and "Traceback" not in res.output
    res = invoke("report", "compare", tmp_path / "nowhere")
    assert res.exit_code == 2 and "no campaign found" in res.output
    res = invoke("report", "compare", rc.campaign_dir, "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}")
    assert res.exit_code == 2 and "does not exist" in res.output
    assert not (tmp_path / "missing.db").exists(), "a report must not create an empty store"
    res = invoke("report", "compare", rc.campaign_dir, "--tracking-uri", f"http://127.0.0.1:{free_port()}",
                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "error:" in res.output


def test_compare_json_reports_the_confirmed_winner(report_campaign):
    """The confirm stage (top 2 x 2 seeds): the winner is the best mean selection value, its test
    top-1 is the mean ± sample std (n-1) over the seeds, and it is one of the search's top 2."""
    import statistics

    rc = report_campaign
    res = invoke("report", "compare", rc.campaign_dir, "--format", "json")
    assert res.exit_code == 0, res.output
    client = rc.client()
    exp = client.get_experiment_by_name(rc.experiment).experiment_id
    for row in json.loads(res.stdout):
        runs = client.search_runs([exp], filter_string=f"tags.`oscqat.target` = '{row['target']}' and "
                                                       f"tags.`oscqat.stage` = 'confirm'")
        assert len(runs) == 4, [r.info.run_name for r in runs]
        by_source = {}
        for r in runs:
            by_source.setdefault(r.data.tags["oscqat.confirm_of"], []).append(r)
        trials = _optuna_trials(rc, row["target"].replace("/", "-"))
        complete = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))
        assert set(by_source) == {t.user_attrs["tune_trial_id"] for t in complete[:2]}
        means = {tid: statistics.mean(r.data.metrics["val_top1"] for r in rs) for tid, rs in by_source.items()}
        assert row["confirmed_trial_id"] in means
        assert row["confirmed_val_top1_mean"] == pytest.approx(max(means.values()), abs=1e-12)
        winner_runs = by_source[row["confirmed_trial_id"]]
        tests = [r.data.metrics["test_top1"] for r in winner_runs]
        assert row["confirmed_test_top1_mean"] == pytest.approx(statistics.mean(tests), abs=1e-12)
        assert row["confirmed_test_top1_std"] == pytest.approx(statistics.stdev(tests), abs=1e-12)  # n-1
        assert row["confirm_seeds"] == sorted(int(r.data.params["seed"]) for r in winner_runs) == [1000, 1001]
        assert row["selected_on"] == "val_top1"
        tied = [t for t, m in means.items() if t != row["confirmed_trial_id"] and abs(m - max(means.values())) < 1e-9]
        assert row["confirm_ties"] == tied
