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
