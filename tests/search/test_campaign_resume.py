"""Kill the driver mid-campaign (SIGKILL to its whole process group), then `oscqat search resume`.

Two targets: the first finishes, the second is killed mid-way; the resume skips the first and
restores the second from Tune's experiment snapshot.

After the resume: every target done, no MLflow run duplicated, each finished trial's metric
history has every epoch exactly once, and the Optuna study agrees with MLflow (no RUNNING trials).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest

from searchtest_utils import (campaign_dict, check_records, cli_env, kill_session, run_cli, session_pids, start_cli,
                              tail, write_campaign, write_space)

NAME = "killed"
MAX_EPOCHS = 3  # the kill lands after epoch 1 of the second target: two epochs of slack
CHECKPOINTS_TO_KEEP = 1  # Tune then snapshots the experiment at every checkpoint
POINTS = ["good-lsq"]
NUM_SAMPLES = 1  # per target: a trial actor costs ~10-30 s to start on a busy 2-core machine


def _mlflow_metric_rows(db, target: str) -> int:
    """Metric rows MLflow's sqlite store holds for the target's runs (read-only peek)."""
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from metrics m join tags t on m.run_uuid = t.run_uuid "
                               "where t.key = 'oscqat.target' and t.value = ?", (target,)).fetchone()[0]
    except sqlite3.Error:  # tables not created yet, or locked for a moment
        return 0


def _snapshotted_checkpoints(exp_dir) -> list[str]:
    """Trials whose checkpoint Tune's latest experiment snapshot already records (what a restore
    can continue from; a checkpoint written after the last snapshot is not known to a restore)."""
    found = []
    for path in sorted(exp_dir.glob("experiment_state-*.json"))[-1:]:
        try:
            trial_data = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being replaced right now
            return []
        for trial_json, runtime_json in trial_data:
            last = json.loads(runtime_json).get("last_result") or {}
            if last.get("checkpoint_dir_name") and any(exp_dir.glob(f"*{last.get('trial_id')}*/{last['checkpoint_dir_name']}")):
                found.append(last["trial_id"])
    return found


@pytest.mark.timeout(480)
def test_kill_driver_then_resume(tmp_path, ray_tmp, fp_checkpoint):
    space = write_space(tmp_path, POINTS)
    camp = write_campaign(tmp_path, campaign_dict(NAME, space, bits=("w4a4", "w3a3"), num_samples=NUM_SAMPLES,
                                                  max_epochs=MAX_EPOCHS, pretrained=fp_checkpoint,
                                                  checkpoints_to_keep=CHECKPOINTS_TO_KEEP))
    env = cli_env(ray_tmp)
    campaign_dir = tmp_path / "ray_results" / NAME
    exp_dir = campaign_dir / "demo_net-w3a3"  # the second target: killed while it runs
    proc, out, err = start_cli(["search", "run", camp.name], tmp_path, env, "run")
    try:
        # wait until the second target has a checkpoint that Tune's snapshot knows and MLflow has its
        # per-epoch metrics, then SIGKILL the driver's whole process group
        deadline = time.monotonic() + 300
        while not (_snapshotted_checkpoints(exp_dir) and _mlflow_metric_rows(tmp_path / "mlflow.db", "demo_net/w3a3") > 0):
            assert proc.poll() is None, f"the campaign ended before it could be killed:\n{tail(out)}\n{tail(err)}"
            assert time.monotonic() < deadline, f"no checkpoint/metrics in time:\n{tail(out)}\n{tail(err)}"
            time.sleep(0.25)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # Ray's trial workers (own process groups) may outlive the driver for seconds: resume regardless
        survivors = session_pids(proc.pid, alive_only=True)
        print(f"killed the driver; {len(survivors)} process(es) of its session still alive: {survivors}")
        state = json.loads((campaign_dir / "state.json").read_text())
        assert {k: v["status"] for k, v in state["targets"].items()} == {"demo_net/w4a4": "done",
                                                                         "demo_net/w3a3": "running"}

        res = run_cli(["search", "resume", NAME], tmp_path, env, timeout=360, log_prefix="resume")
        assert res.returncode == 0, res.output[-5000:]
        assert "demo_net/w4a4: already finished" in res.stdout
        assert "resuming demo_net/w3a3" in res.stdout
    finally:
        kill_session(proc.pid)  # whatever of the killed run's session is still alive, by PID

    state = json.loads((campaign_dir / "state.json").read_text())
    assert {k: v["status"] for k, v in state["targets"].items()} == {"demo_net/w4a4": "done", "demo_net/w3a3": "done"}

    recs = check_records("sqlite:///" + str(tmp_path / "mlflow.db"), NAME, "sqlite:///" + str(tmp_path / "optuna.db"),
                         NAME, {"demo_net/w4a4": f"{NAME}.demo_net-w4a4", "demo_net/w3a3": f"{NAME}.demo_net-w3a3"},
                         MAX_EPOCHS, NUM_SAMPLES, exact_values=False)
    # every trial trained its full budget: none was lost, failed or stopped early by the kill
    for rec in recs.values():
        states = {tid: t.state.name for tid, t in rec.trials.items()}
        assert set(states.values()) == {"COMPLETE"}, (rec.label, states)

    # Tune restored (at least) one trial of the killed target from its checkpoint, not from scratch
    restored = set()
    for result_file in exp_dir.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            row = json.loads(line)
            if row.get("iterations_since_restore", row["training_iteration"]) < row["training_iteration"]:
                restored.add(row["trial_id"])
    assert restored, "no trial continued from a checkpoint"
    assert restored <= set(recs["demo_net/w3a3"].children)
