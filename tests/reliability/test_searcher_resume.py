"""The searcher after Tune resumes an errored trial (``resume_errored=True``), without Ray running:
the searcher's Tune-facing methods are called in the order Tune calls them."""

from __future__ import annotations

import pickle

import optuna
import pytest

pytestmark = pytest.mark.timeout(120)


def _space(trial):
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)


def test_resumed_errored_trial_is_recorded_in_optuna(tmp_path):
    """Before: the resumed trial's results were dropped ("Received additional result ... already finished")
    and Optuna kept it FAIL while MLflow said FINISHED/COMPLETE, so TPE never learnt its value."""
    from search.searcher import TRIAL_ID_ATTR, build_searcher, make_storage

    url = f"sqlite:///{tmp_path / 'o.db'}"
    searcher = build_searcher(_space, [], [], "s", url, seed=0, max_epochs=2)
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"val_top1": 0.4, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("t1", None, error=True)  # ERROR after max_failures
    searcher = pickle.loads(pickle.dumps(searcher))  # the driver restarts: Tune restores the searcher
    searcher.on_trial_result("t1", {"val_top1": 0.6, "training_iteration": 2, "epoch": 2})
    searcher.on_trial_complete("t1", {"val_top1": 0.6, "training_iteration": 2, "epoch": 2})

    study = optuna.load_study(study_name="s", storage=make_storage(url))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    revived = trials[-1]
    assert revived.user_attrs[TRIAL_ID_ATTR] == "t1" and revived.value == pytest.approx(0.6)
    assert revived.params == trials[0].params and revived.intermediate_values == {1: 0.4, 2: 0.6}
    assert study.best_trial.number == revived.number


def test_a_trial_that_fails_again_stays_one_fail(tmp_path):
    from search.searcher import build_searcher, make_storage

    url = f"sqlite:///{tmp_path / 'o.db'}"
    searcher = build_searcher(_space, [], [], "s", url, seed=0, max_epochs=2)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", None, error=True)
    searcher.on_trial_complete("t1", None, error=True)
    study = optuna.load_study(study_name="s", storage=make_storage(url))
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]


def test_starting_point_asked_before_a_driver_kill_still_trains_with_its_label(tmp_path):
    """SIGKILL just after a trial was asked: the restored searcher (Tune's older snapshot) does not know
    it. Before: the enqueued point ended FAIL and its label moved to a TPE-sampled trial."""
    from search.searcher import START_POINT_ATTR, TRIAL_ID_ATTR, build_searcher, make_storage

    url = f"sqlite:///{tmp_path / 'o.db'}"
    points, names = [{"lr": 0.05}, {"lr": 0.002}], ["paper-a", "paper-b"]
    searcher = build_searcher(_space, points, names, "s", url, seed=0, max_epochs=2)
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))  # Tune's last experiment snapshot
    pickled = pickle.dumps(searcher)  # the searcher inside tuner.pkl
    searcher.suggest("dead1")  # asked from Optuna (paper-a), then the driver is SIGKILLed

    restored = pickle.loads(pickled)  # Tuner.restore unpickles it (no new enqueue) ...
    restored.restore(str(snapshot))  # ... and restores its state from the snapshot
    configs = {tid: restored.suggest(tid) for tid in ("t1", "t2", "t3")}

    study = optuna.load_study(study_name="s", storage=make_storage(url))
    by_tid = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in study.get_trials()}
    assert by_tid["dead1"].state.name == "FAIL"
    trained = {tid: by_tid[tid] for tid in configs}
    labelled = {t.user_attrs.get(START_POINT_ATTR): t.params for t in trained.values() if START_POINT_ATTR in t.user_attrs}
    assert labelled == {"paper-a": {"lr": 0.05}, "paper-b": {"lr": 0.002}}  # both recipes train, labels on their params
    sampled = [t for t in trained.values() if START_POINT_ATTR not in t.user_attrs]
    assert len(sampled) == 1 and sampled[0].params["lr"] not in (0.05, 0.002)
