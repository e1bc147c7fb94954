"""End to end through the CLI with the embedded defaults: local Ray, sqlite MLflow and Optuna.

``oscqat search run`` runs as a subprocess with cwd = a temporary directory, so
``sqlite:///mlflow.db``, ``sqlite:///optuna.db`` and ``./ray_results`` all land there.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from searchtest_utils import (assert_best_reported, assert_starting_points_first, campaign_dict, check_records,
                              cli_env, run_cli, start_cli, wait_cli, write_campaign, write_space)

NAME = "e2e"
MAX_EPOCHS = 2
POINTS = ["good-lsq", "collapse"]  # enqueued starting points, in order
NUM_SAMPLES = 3  # the 2 starting points + 1 sampled by TPE, one at a time (max_concurrent_trials 1)


@pytest.mark.timeout(420)
def test_search_run_end_to_end(tmp_path, ray_tmp):
    space = write_space(tmp_path, POINTS)
    camp = write_campaign(tmp_path, campaign_dict(NAME, space, num_samples=NUM_SAMPLES, max_epochs=MAX_EPOCHS,
                                                  max_concurrent_trials=1))
    env = cli_env(ray_tmp)

    res = run_cli(["search", "run", camp.name], tmp_path, env, timeout=360, log_prefix="run")
    assert res.returncode == 0, res.output[-5000:]

    # embedded defaults, relative to the working directory
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "optuna.db").is_file()
    campaign_dir = tmp_path / "ray_results" / NAME
    assert (campaign_dir / "campaign.yaml").is_file()
    state = json.loads((campaign_dir / "state.json").read_text())
    assert state["targets"]["demo_net/w4a4"]["status"] == "done"
    assert (campaign_dir / "demo_net-w4a4").is_dir()
    # the shared FP checkpoint was made once, by the campaign
    assert (campaign_dir / "fp" / "demo_net.pt").is_file()
    assert res.stdout.count("pretraining the shared FP checkpoint") == 1

    recs = check_records("sqlite:///" + str(tmp_path / "mlflow.db"), NAME, "sqlite:///" + str(tmp_path / "optuna.db"),
                         NAME, {"demo_net/w4a4": f"{NAME}.demo_net-w4a4"}, MAX_EPOCHS, NUM_SAMPLES)
    rec = recs["demo_net/w4a4"]

    # ASHA stopped the collapsing starting point at the first rung; Optuna and MLflow say PRUNED
    collapse = [tid for tid, t in rec.trials.items() if t.user_attrs.get("starting_point") == "collapse"]
    assert len(collapse) == 1
    assert rec.trials[collapse[0]].state.name == "PRUNED", rec.trials[collapse[0]]
    assert rec.epochs(collapse[0]) == 1
    pruned_run = rec.children[collapse[0]]  # not red "Killed" in the UI: FINISHED, tagged and named pruned
    assert pruned_run.info.status == "FINISHED" and pruned_run.data.tags["oscqat.pruned"] == "true"
    assert pruned_run.info.run_name.endswith("· pruned at epoch 1"), pruned_run.info.run_name
    good = [tid for tid, t in rec.trials.items() if t.user_attrs.get("starting_point") == "good-lsq"]
    assert rec.trials[good[0]].state.name == "COMPLETE"  # the good point trained its full budget

    # the enqueued points ran first (Optuna trials 0..1, in file order), then the sampled one
    assert_starting_points_first(rec, POINTS)
    ordered = sorted(rec.trials.values(), key=lambda t: t.number)
    runs = [rec.children[t.user_attrs["tune_trial_id"]] for t in ordered]
    for earlier, later in zip(runs, runs[1:]):  # one at a time: each started after the previous ended
        assert later.info.start_time >= earlier.info.end_time, (earlier.info, later.info)

    # artifacts of every finished trial (sqlite backend: ./mlruns next to mlflow.db)
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    for run in rec.children.values():
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"train_config.yaml", "layer_oscillations.json"} <= names, names

    # the best config is reported in the run's table
    assert_best_reported(res.stdout, rec)

    # `oscqat search status` (reads only) and `oscqat search run` on the same name again (refused before
    # anything is written) run side by side to save a CLI start-up
    before = _row_counts(tmp_path)
    status_proc = start_cli(["search", "status", NAME], tmp_path, env, "status")
    again = run_cli(["search", "run", camp.name], tmp_path, env, timeout=120, log_prefix="again")
    status = wait_cli(status_proc, timeout=120)

    assert status.returncode == 0, status.output[-3000:]
    assert_best_reported(status.stdout, rec, status="done")

    assert again.returncode != 0
    assert "already exists" in again.output and "oscqat search resume" in again.output, again.output[-2000:]
    assert _row_counts(tmp_path) == before  # nothing added to MLflow or Optuna


def _row_counts(directory) -> tuple[int, int]:
    with sqlite3.connect(f"file:{directory / 'mlflow.db'}?mode=ro", uri=True) as m:
        runs = m.execute("select count(*) from runs").fetchone()[0]
    with sqlite3.connect(f"file:{directory / 'optuna.db'}?mode=ro", uri=True) as o:
        trials = o.execute("select count(*) from trials").fetchone()[0]
    return runs, trials


@pytest.mark.timeout(120)
def test_bad_campaign_file_exits_2_before_ray(tmp_path, ray_tmp, space_file):
    data = campaign_dict("bad", space_file)
    data["budget"]["num_samples"] = 0  # out of range
    data["resources"] = {"cpus": 1}  # unknown key (typo of cpu)
    camp = write_campaign(tmp_path, data)
    before = sorted(p.name for p in tmp_path.iterdir())

    res = run_cli(["search", "run", camp.name], tmp_path, cli_env(ray_tmp), timeout=100, log_prefix="bad")

    assert res.returncode == 2, res.output[-2000:]
    assert "budget.num_samples" in res.stderr and "resources.cpus" in res.stderr, res.stderr
    assert "Traceback" not in res.output
    after = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("bad."))  # minus our log files
    assert after == before  # no ray_results/, mlflow.db, optuna.db, mlruns/
    assert not (ray_tmp / "ray").exists(), "Ray was started"
