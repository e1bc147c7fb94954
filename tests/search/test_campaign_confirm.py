"""Remedy-aware rungs and the confirm stage, end to end through the CLI, with a driver kill.

One target whose space samples the remedy starts (dampen_start, freeze_start up to 0.5 of 4
epochs): `grace_period: auto` puts the first ASHA rung at epoch 3, so every trial stopped early
ran at least one full epoch with its remedy on. The collapsing starting point (a freeze trial)
runs last, one trial at a time, so it is always stopped at that rung.

Then the confirm stage retrains the top-2 configs with 2 fresh seeds. The driver is SIGKILLed
while it runs and the campaign resumed: exactly one confirm run per (config, seed), none lost,
and the parent names the config with the best mean selection value.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter

import pytest
import yaml

from searchtest_utils import (campaign_dict, check_records, cli_env, kill_session, run_cli, start_cli, tail,
                              write_campaign)

NAME = "confirmed"
MAX_EPOCHS = 4
NUM_SAMPLES = 4
SEEDS = [1000, 1001]  # campaign seed 0 + 1000 + i
POINTS = [
    {"name": "good-lsq", "method": "lsq", "lr": 0.03, "weight_decay": 5e-5},
    {"name": "good-dampen", "method": "dampen", "lr": 0.03, "weight_decay": 5e-5, "dampen_lambda": 0.1,
     "dampen_start": 0.5},
    {"name": "good-freeze", "method": "freeze", "lr": 0.03, "weight_decay": 5e-5, "freeze_start": 0.25},
    {"name": "collapse", "method": "freeze", "lr": 0.5, "weight_decay": 1.0, "freeze_start": 0.5},
]
SPACE = {
    "name": "confirm_test", "arch": "demo_net", "description": "sampled remedy starts",
    "params": {
        "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "weight_decay": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
        "method": {"type": "categorical", "choices": ["lsq", "dampen", "freeze"]},
        "dampen_lambda": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "when": {"method": ["dampen"]}},
        "dampen_start": {"type": "float", "low": 0.0, "high": 0.5, "when": {"method": ["dampen"]}},
        "freeze_start": {"type": "float", "low": 0.1, "high": 0.5, "when": {"method": ["freeze"]}},
    },
    "bits": {"w3a3": {"starting_points": POINTS}},
}


def _confirm_checkpointed(exp_dir) -> bool:
    """Tune's latest snapshot of the confirm experiment knows at least one trial checkpoint."""
    for path in sorted(exp_dir.glob("experiment_state-*.json"))[-1:]:
        try:
            trial_data = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            return False
        return any((json.loads(rt).get("last_result") or {}).get("checkpoint_dir_name") for _, rt in trial_data)
    return False


@pytest.mark.timeout(600)
def test_rungs_wait_for_remedies_and_confirm_survives_a_driver_kill(tmp_path, ray_tmp, fp_checkpoint):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    data = campaign_dict(NAME, space, bits=("w3a3",), num_samples=NUM_SAMPLES, max_epochs=MAX_EPOCHS,
                         pretrained=fp_checkpoint, max_concurrent_trials=1,
                         confirm={"top_k": 2, "seeds": len(SEEDS)})
    data["budget"] = {"num_samples": NUM_SAMPLES, "max_epochs": MAX_EPOCHS, "grace_period": "auto",
                      "reduction_factor": 2}
    camp = write_campaign(tmp_path, data)
    env = cli_env(ray_tmp)
    campaign_dir = tmp_path / "ray_results" / NAME
    confirm_dir = campaign_dir / "demo_net-w3a3-confirm"
    proc, out, err = start_cli(["search", "run", camp.name], tmp_path, env, "run")
    try:
        deadline = time.monotonic() + 400
        while not _confirm_checkpointed(confirm_dir):
            assert proc.poll() is None, f"the campaign ended before the kill:\n{tail(out)}\n{tail(err)}"
            assert time.monotonic() < deadline, f"no confirm checkpoint in time:\n{tail(out)}\n{tail(err)}"
            time.sleep(0.25)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        first = out.read_text()
        assert "ASHA rungs at epoch 3 of 4 (grace 3" in first, first[-3000:]
        assert "remedies start by epoch 2 at the latest" in first
        state = json.loads((campaign_dir / "state.json").read_text())
        assert state["targets"]["demo_net/w3a3"]["status"] == "confirming"

        res = run_cli(["search", "resume", NAME], tmp_path, env, timeout=400, log_prefix="resume")
        assert res.returncode == 0, res.output[-5000:]
        assert "resuming the confirm stage of demo_net/w3a3" in res.stdout
    finally:
        kill_session(proc.pid)

    tracking, optuna_url = "sqlite:///" + str(tmp_path / "mlflow.db"), "sqlite:///" + str(tmp_path / "optuna.db")
    recs = check_records(tracking, NAME, optuna_url, NAME, {"demo_net/w3a3": f"{NAME}.demo_net-w3a3"},
                         MAX_EPOCHS, NUM_SAMPLES, exact_values=False)
    rec = recs["demo_net/w3a3"]

    # remedy-aware rungs: the collapse point was stopped, and no remedy trial before its remedy acted
    pruned = rec.by_state("PRUNED")
    assert pruned, {t: x.state.name for t, x in rec.trials.items()}
    for tid in pruned:
        params = rec.trials[tid].params
        start = params.get("dampen_start", params.get("freeze_start"))
        if params["method"] != "lsq":
            assert rec.epochs(tid) >= math.ceil(start * MAX_EPOCHS) + 1, (tid, params, rec.epochs(tid))

    # the confirm stage: the top-2 COMPLETE search trials x 2 fresh seeds, each exactly once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`oscqat.stage` = 'confirm'", max_results=100)
    complete = sorted((t for t in rec.trials.values() if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))
    top2 = [t.user_attrs["tune_trial_id"] for t in complete[:2]]
    pairs = Counter((r.data.tags["oscqat.confirm_of"], int(r.data.params["seed"])) for r in runs)
    assert pairs == Counter({(tid, s): 1 for tid in top2 for s in SEEDS}), pairs
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["oscqat.state"] == "COMPLETE", run.info
        assert run.data.tags["mlflow.parentRunId"] == rec.parent.info.run_id
        source = rec.trials[run.data.tags["oscqat.confirm_of"]]
        for key, value in source.params.items():  # the confirmed config is the search trial's, seed aside
            assert run.data.params[key] == str(value) or math.isclose(float(run.data.params[key]), value)
        assert len(client.get_metric_history(run.info.run_id, "val_top1")) >= MAX_EPOCHS
    means = {}
    for tid in top2:
        vals = [r.data.metrics["val_top1"] for r in runs if r.data.tags["oscqat.confirm_of"] == tid]
        means[tid] = sum(vals) / len(vals)
    winner = max(top2, key=lambda t: (means[t], -top2.index(t)))
    parent = client.get_run(rec.parent.info.run_id)
    assert parent.data.tags["oscqat.confirmed_trial_id"] == winner, (means, parent.data.tags)
    assert math.isclose(parent.data.metrics["confirmed_val_top1_mean"], means[winner], rel_tol=1e-9)
    assert json.loads(parent.data.tags["oscqat.confirm_seeds"]) == SEEDS
    assert winner in res.stdout  # the results table shows the confirmed winner
