"""Ray Tune's ``OptunaSearch`` with the trial states Optuna should see (see ``search.searcher``).

Kept apart from ``search.searcher`` because it imports Ray Tune: the read-only commands use the
storages and trial states there and start in about a second.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.searcher import START_POINT_ATTR, TRIAL_ID_ATTR, trial_state

log = logging.getLogger("search.searcher")


class StateAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records ASHA-stopped trials as PRUNED and failed ones as FAIL."""

    def __init__(self, *args, max_epochs: int, start_point_names: list[str] | None = None,
                 study_attrs: dict | None = None, **kwargs):
        self._study_attrs = dict(study_attrs or {})  # set before super(): it may create the study
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._start_point_names = list(start_point_names or [])
        self._suggested = 0

    def _setup_study(self, mode):
        """Name the objective (the dashboard shows ``val_top1``, not ``Objective 0``) and record
        which campaign, target and MLflow runs the study belongs to."""
        super()._setup_study(mode)
        import warnings

        try:
            with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna
                warnings.simplefilter("ignore")
                self._ot_study.set_metric_names([self.metric] if isinstance(self.metric, str)
                                                else list(self.metric))
            for key, value in self._study_attrs.items():
                self._ot_study.set_user_attr(key, value)
        except Exception as exc:  # noqa: BLE001 - labels only: never stop the search for them
            log.warning("could not label the Optuna study: %s", exc)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
            if self._suggested < len(self._start_point_names):
                ot_trial.set_user_attr(START_POINT_ATTR, self._start_point_names[self._suggested])
        self._suggested += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        state = trial_state(result, error, self._max_epochs)
        self._report_last(trial_id, result)
        if state is TrialState.COMPLETE:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        try:
            if state is TrialState.FAIL and result and result.get("failure_reason"):
                ot_trial.set_user_attr("failure_reason", str(result["failure_reason"])[:500])
            self._ot_study.tell(ot_trial, None, state=state)
        except Exception as exc:  # noqa: BLE001 - keep the campaign going, but say why
            log.warning("could not record trial %s as %s in Optuna: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)

    def _report_last(self, trial_id: str, result: dict | None) -> None:
        """Tune hands the final result to on_trial_complete only: keep it as an intermediate value."""
        if not result or result.get("failure_reason") or self.metric not in result:
            return
        step = int(result.get("training_iteration", result.get("epoch", 0)))
        ot_trial = self._ot_trials[trial_id]
        try:
            if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
                ot_trial.report(float(result[self.metric]), step)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not report the last value of %s: %s", trial_id, exc)
