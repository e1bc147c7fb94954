"""The driver-side MLflow callback with a tracking server that goes away and comes back.

A fake MlflowClient (no Ray, no server) makes the behaviour exact: while it is "down" every call
raises; the callback must keep every write (including run creation) buffered in order, not stall
the driver by hammering the server on every event, and deliver everything once it is back.
The end-to-end version with a real ``mlflow server`` is test_campaign_faults.py::test_mlflow_outage_loses_nothing.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.timeout(60)


class FakeClient:
    def __init__(self):
        self.down = False
        self.calls = 0
        self.runs: dict[str, dict] = {}
        self._ids = itertools.count()

    def _check(self):
        self.calls += 1
        if self.down:
            raise ConnectionError("server down")

    def search_runs(self, *a, **k):
        self._check()
        return []

    def create_run(self, experiment_id, run_name=None, tags=None):
        self._check()
        rid = f"run{next(self._ids)}"
        self.runs[rid] = {"tags": dict(tags or {}), "params": {}, "metrics": [], "status": "RUNNING", "artifacts": 0}
        return SimpleNamespace(info=SimpleNamespace(run_id=rid))

    def log_batch(self, run_id, metrics=(), params=()):
        self._check()
        self.runs[run_id]["metrics"] += [(m.key, m.step) for m in metrics]
        self.runs[run_id]["params"].update({p.key: p.value for p in params})

    def set_tag(self, run_id, key, value):
        self._check()
        self.runs[run_id]["tags"][key] = value

    def update_run(self, run_id, status=None, name=None):
        self._check()
        if name is not None:
            self.runs[run_id]["name"] = name

    def set_terminated(self, run_id, status):
        self._check()
        self.runs[run_id]["status"] = status

    def log_artifacts(self, run_id, path):
        self._check()
        self.runs[run_id]["artifacts"] += 1


def _trial(tid: str, last_result=None):
    return SimpleNamespace(trial_id=tid, config={"method": "lsq", "lr": 0.05}, last_result=last_result or {},
                           error_msg=None)


def _result(epoch: int) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "val_top1": 0.5 + epoch / 100, "train_loss": 1.0 / epoch}


@pytest.fixture
def callback():
    from oscqat.config import TrainConfig
    from search.tracking import MlflowTrialCallback

    base = TrainConfig(arch="demo_net", bits="w4a4", epochs=3, device="cpu").model_dump(mode="json")
    cb = MlflowTrialCallback("http://127.0.0.1:1", "1", "parent", "camp", "demo_net/w4a4", base, 3, "camp.study")
    cb._client = FakeClient()
    cb.writer.retry_interval_s = 0.0  # retry on every event (the back-off is tested separately)
    return cb


def test_outage_from_the_first_event_loses_nothing(callback):
    """The server is down before the trial's run exists: run creation, params, every epoch, the
    retry tag and the final state are all buffered and delivered later, once each, in order."""
    cb, client = callback, callback._client
    t = _trial("t1")
    client.down = True
    cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t, _result(1))
    cb.on_trial_recover(0, [], t)
    cb.on_trial_result(0, [], t, _result(2))
    assert client.runs == {} and len(cb.writer.pending) == 3
    client.down = False
    t.last_result = _result(3)
    cb.on_trial_result(0, [], t, _result(3))
    cb.on_trial_complete(0, [], t)
    assert cb.flush(force=True) and not cb.writer.pending
    (run,) = client.runs.values()
    assert sorted(s for k, s in run["metrics"] if k == "val_top1") == [1, 2, 3]
    assert run["tags"]["oscqat.retries"] == "1" and run["tags"]["oscqat.state"] == "COMPLETE"
    assert run["tags"]["oscqat.trial_id"] == "t1" and run["tags"]["mlflow.parentRunId"] == "parent"
    assert run["params"]["method"] == "lsq" and run["status"] == "FINISHED" and run["artifacts"] == 1
    assert "oscqat.pruned" not in run["tags"]


def test_outage_mid_trial_and_duplicate_reports(callback):
    cb, client = callback, callback._client
    t = _trial("t2")
    cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t, _result(1))
    client.down = True
    cb.on_trial_result(0, [], t, _result(2))
    cb.on_trial_result(0, [], t, _result(2))  # the same epoch again (e.g. a restored trial re-reporting)
    client.down = False
    t.last_result = {**_result(2), "failure_reason": "non-finite training loss (nan) at epoch 3"}
    cb.on_trial_complete(0, [], t)
    (run,) = client.runs.values()
    assert sorted(s for k, s in run["metrics"] if k == "val_top1") == [1, 2]
    assert run["status"] == "FAILED" and run["tags"]["oscqat.state"] == "FAIL"
    assert "non-finite" in run["tags"]["oscqat.failure_reason"]


def test_down_server_is_not_retried_on_every_event(callback):
    """After a failure the callback waits retry_interval_s before calling the server again, so a
    dead server does not cost MLflow's HTTP timeout on every result the driver processes."""
    cb, client = callback, callback._client
    cb.writer.retry_interval_s = 3600.0
    t = _trial("t3")
    cb.on_trial_start(0, [], t)
    client.down = True
    cb.on_trial_result(0, [], t, _result(1))
    calls = client.calls
    for epoch in (2, 3):
        cb.on_trial_result(0, [], t, _result(epoch))
    assert client.calls == calls, "no server calls while backing off"
    assert len(cb.writer.pending) == 3
    client.down = False
    assert cb.flush(force=True)  # the end of the experiment forces a flush
    (run,) = client.runs.values()
    assert sorted(s for k, s in run["metrics"] if k == "val_top1") == [1, 2, 3]


def test_undeliverable_writes_point_to_report_sync(callback, caplog):
    cb, client = callback, callback._client
    t = _trial("t4")
    client.down = True
    cb.on_trial_result(0, [], t, _result(1))
    import search.run_writer as tracking

    orig = tracking.time.sleep
    tracking.time.sleep = lambda s: None
    try:
        cb.on_experiment_end([])
    finally:
        tracking.time.sleep = orig
    assert "oscqat report sync" in caplog.text and len(cb.writer.pending) == 1


def test_http_client_fails_fast(monkeypatch):
    """client_for() caps MLflow's HTTP retries (default: ~4 minutes per request on a dead server)
    unless the user set them, and hides credentials from MLflow's "View run at <URI>" lines."""
    from search.tracking import client_for

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")  # the user's choice wins
    import os

    client_for("http://u:pw@127.0.0.1:1")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_pruned_trial_is_not_shown_as_failed_or_killed(callback):
    """ASHA's stop is no failure: the run ends FINISHED, tagged pruned, named and described so."""
    cb, client = callback, callback._client
    t = _trial("t5", _result(1))
    cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t, _result(1))
    cb.on_trial_complete(0, [], t)  # 1 of 3 epochs, no failure: pruned
    (run,) = client.runs.values()
    assert run["status"] == "FINISHED" and run["tags"]["oscqat.state"] == "PRUNED"
    assert run["tags"]["oscqat.pruned"] == "true" and run["name"].endswith("· pruned at epoch 1")
    assert "ASHA stopped this trial after epoch 1 of 3" in run["tags"]["mlflow.note.content"]
