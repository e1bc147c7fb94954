"""Faults inside a running campaign (see conftest.fault_campaign for the campaign and its faults).

One real ``oscqat search run`` (local Ray, real ``mlflow server``, sqlite Optuna) with a trial that
raises, a trial whose process is SIGKILLed, a trial whose loss turns NaN, a normal trial, and the
MLflow server stopped and restarted in the middle.
"""

from __future__ import annotations

from collections import Counter

import pytest

from .conftest import CHECKPOINTS_TO_KEEP, DATA_SECRET, MAX_EPOCHS, TRACKING_SECRET
from .helpers import no_traceback

pytestmark = [pytest.mark.timeout(900)]  # the first test pays for the shared campaign (~2-4 min)


def _runs_by_trial(run) -> dict[str, list]:
    by: dict[str, list] = {}
    for r in run.child_runs():
        by.setdefault(r.data.tags["oscqat.trial_id"], []).append(r)
    return by


def _steps(run, run_id: str, key: str = "val_top1") -> list[int]:
    return sorted(m.step for m in run.client().get_metric_history(run_id, key))


def test_campaign_finishes_despite_faults(fault_campaign):
    run = fault_campaign
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(run.trials) == {"lsq", "dampen", "freeze", "dampen+freeze"}, run.trials
    assert no_traceback(run.stdout)
    counts = Counter(t.state.name for t in run.study().get_trials(deepcopy=False))
    assert counts == {"COMPLETE": 3, "FAIL": 1}, counts


@pytest.mark.parametrize("method,marker", [("lsq", "injected fault at epoch 2"), ("dampen", "")])
def test_failed_trial_is_retried_from_its_checkpoint(fault_campaign, method, marker):
    """raise@2 (an exception) and kill@2 (SIGKILL of the trial process, a worker crash)."""
    run = fault_campaign
    trial = run.trials[method]
    # the fault really fired inside the Ray worker (so OSCQAT_FAULT_INJECT reached it) ...
    assert trial.error_text, f"no error.txt: the {method} fault did not fire"
    if marker:
        assert marker in trial.error_text
    else:  # the process died: Ray reports a dead actor/worker, not a Python exception
        assert "injected fault" not in trial.error_text
    # ... and the retry resumed from the epoch-1 checkpoint: epoch 1 trained once, not twice
    assert trial.epochs_reported == list(range(1, MAX_EPOCHS + 1)), trial.epochs_reported
    runs = _runs_by_trial(run)[trial.trial_id]
    assert len(runs) == 1, "one MLflow child run per trial, also across retries"
    child = runs[0]
    assert child.info.status == "FINISHED"
    assert child.data.tags.get("oscqat.retries") == "1"
    assert child.data.tags.get("oscqat.state") == "COMPLETE"
    assert _steps(run, child.info.run_id) == list(range(1, MAX_EPOCHS + 1))


def test_nan_loss_stops_trial_with_reason(fault_campaign):
    run = fault_campaign
    trial = run.trials["freeze"]
    assert trial.epochs_reported == [1], "the trial stops at once in epoch 2, no further epochs"
    assert not trial.error_text, "a diverged trial is reported, not raised: it is not retried"
    reason = trial.results[-1]["failure_reason"]
    assert "non-finite training loss" in reason and "epoch 2" in reason
    (child,) = _runs_by_trial(run)[trial.trial_id]
    assert child.info.status == "FAILED"
    assert child.data.tags.get("oscqat.state") == "FAIL"
    assert "non-finite training loss" in child.data.tags.get("oscqat.failure_reason", "")
    assert "oscqat.retries" not in child.data.tags
    assert _steps(run, child.info.run_id) == [1]
    (ot,) = [t for t in run.study().get_trials(deepcopy=False) if t.user_attrs.get("tune_trial_id") == trial.trial_id]
    assert ot.state.name == "FAIL"
    assert "non-finite" in ot.user_attrs.get("failure_reason", "")
    # the campaign went on: the other trials completed
    others = [t for m, t in run.trials.items() if m != "freeze"]
    assert all(t.epochs_reported == list(range(1, MAX_EPOCHS + 1)) for t in others)
    normal = _runs_by_trial(run)[run.trials["dampen+freeze"].trial_id][0]
    assert normal.info.status == "FINISHED" and "oscqat.retries" not in normal.data.tags


def test_checkpoints_kept_per_trial_are_bounded(fault_campaign):
    run = fault_campaign
    for method, trial in run.trials.items():
        kept = sorted(p.name for p in trial.path.glob("checkpoint_*"))
        assert 1 <= len(kept) <= CHECKPOINTS_TO_KEEP, (method, kept)
    # each full trial wrote one checkpoint per epoch (indices 0..MAX_EPOCHS-1); only the newest is kept
    newest = f"checkpoint_{MAX_EPOCHS - 1:06d}"
    assert sorted(p.name for p in run.trials["dampen+freeze"].path.glob("checkpoint_*")) == [newest]


def test_mlflow_outage_loses_nothing(fault_campaign):
    """The server was stopped after the first epoch reached it and restarted later: training went
    on meanwhile, the callback buffered the writes and flushed them once the server was back."""
    run = fault_campaign
    o = run.outage
    assert "stopped_at_s" in o and "restarted_at_s" in o, f"the outage did not happen: {o}"
    assert o["epochs_at_restart"] > o["epochs_at_stop"], f"training did not go on while MLflow was down: {o}"
    assert o["metric_rows_while_down"] == o["metric_rows_at_stop"], o
    assert "buffered" in run.stderr, "the callback should say that it buffers writes while MLflow is down"
    runs = _runs_by_trial(run)
    assert set(runs) == {t.trial_id for t in run.trials.values()}
    for method, trial in run.trials.items():
        (child,) = runs[trial.trial_id]
        for key in ("val_top1", "train_loss", "osc_frac"):
            assert _steps(run, child.info.run_id, key) == trial.epochs_reported, (method, key)
        assert child.info.status in ("FINISHED", "FAILED") and child.data.params, method
        artifacts = {f.path for f in run.client().list_artifacts(child.info.run_id)}
        assert "train_config.yaml" in artifacts, (method, artifacts)
    parents = [r for r in run.client().search_runs([run.child_runs()[0].info.experiment_id])
               if r.data.tags.get("oscqat.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_secrets_are_not_logged_or_printed(fault_campaign):
    run = fault_campaign
    for secret in (TRACKING_SECRET, DATA_SECRET):
        assert secret not in run.stdout and secret not in run.stderr, secret
        for r in run.client().search_runs([run.child_runs()[0].info.experiment_id], max_results=1000):
            for k, v in {**r.data.params, **r.data.tags}.items():
                assert secret not in v, (r.data.tags.get("oscqat.role"), k)
        assert secret.encode() not in run.server.db.read_bytes(), f"{secret} is in the MLflow store"
    # the values are still logged, redacted (and the URI is not mangled into a local path)
    client = run.client()  # the campaign base (data_dir among it) is logged on the parent run
    parent = client.get_run(run.child_runs()[0].data.tags["mlflow.parentRunId"])
    assert parent.data.params["data_dir"] == "s3://bucket/digits"
    assert "oscqat-user:***@127.0.0.1" in run.stdout  # the "next steps" hint names the server, redacted
