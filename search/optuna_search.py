"""Ray Tune's ``OptunaSearch`` with the trial states Optuna should see (see ``search.searcher``).

Kept apart from ``search.searcher`` because it imports Ray Tune: the read-only commands use the
storages and trial states there and start in about a second.
"""

from __future__ import annotations

import logging

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.searcher import START_POINT_ATTR, TRIAL_ID_ATTR, trial_state
from search.uris import redact

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
            for key, value in getattr(self, "_study_attrs", {}).items():
                self._ot_study.set_user_attr(key, value)
        except Exception as exc:  # noqa: BLE001 - labels only: never stop the search for them
            log.warning("could not label the Optuna study: %s", exc)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
            name = self._start_point_name(ot_trial)
            if name:
                ot_trial.set_user_attr(START_POINT_ATTR, name)
        self._suggested += 1
        return config

    def _start_point_name(self, ot_trial) -> str | None:
        """The starting point this trial was enqueued as, by its fixed params (not by a count of
        suggestions: after a driver restart the restored count lags Optuna, which moved labels)."""
        fixed = self._ot_study._storage.get_trial_system_attrs(ot_trial._trial_id).get("fixed_params")
        if not fixed:
            return None
        for name, point in zip(self._start_point_names, self._points_to_evaluate or []):
            if all(fixed.get(k) == v for k, v in point.items()):
                return name
        return None

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self.recover_orphans()

    def recover_orphans(self) -> int:
        """After a driver restart: Optuna trials the dead driver asked for but Tune's snapshot does not
        know are FAIL ("orphaned"); a starting point among them is enqueued again, so the recipe
        still trains (before, it ended FAIL and its label moved to a TPE-sampled trial)."""
        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        count = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in known:
                continue
            storage.set_trial_user_attr(t._trial_id, "failure_reason",
                                        "orphaned: the driver stopped before Tune saved this trial")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            fixed = t.system_attrs.get("fixed_params")
            if fixed:
                self._ot_study.enqueue_trial(fixed, skip_if_exists=False)
            count += 1
        if count:
            log.warning("%d Optuna trial(s) asked by the stopped driver were marked FAIL; starting points among "
                        "them were enqueued again", count)
        return count

    # A trial recorded FAIL that Tune later resumes (``resume_errored``) trains on, but Optuna cannot
    # reopen a finished trial: its results were dropped ("additional result ... already finished") and
    # it stayed FAIL while MLflow said COMPLETE. Its new outcome goes into a new Optuna trial with the
    # same params, Tune trial id and all intermediate values (reports take the newest per trial id).
    def _failed(self) -> set:
        if not hasattr(self, "_failed_ids"):  # searcher state pickled before this attribute existed
            self._failed_ids = set()
            self._revived_values = {}
        return self._failed_ids

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self._completed_trials and trial_id in self._failed():
            if self.metric in result:
                step = int(result.get("training_iteration", result.get("epoch", 0)))
                self._revived_values.setdefault(trial_id, {})[step] = float(result[self.metric])
            return
        super().on_trial_result(trial_id, result)

    def _record_revived(self, trial_id: str, result: dict | None, state: TrialState) -> None:
        old = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
        values = {**old.intermediate_values, **self._revived_values.pop(trial_id, {})}
        if result and self.metric in result and not result.get("failure_reason"):
            values[int(result.get("training_iteration", result.get("epoch", 0)))] = float(result[self.metric])
        value = float(result[self.metric]) if state is TrialState.COMPLETE else None
        self._ot_study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=old.params, distributions=old.distributions,
            user_attrs={**old.user_attrs, "resumed_after_fail": old.number}, intermediate_values=values))
        self._failed_ids.discard(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials and trial_id in self._failed():
            state = trial_state(result, error, self._max_epochs)
            if state is not TrialState.FAIL:
                try:
                    self._record_revived(trial_id, result, state)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not record resumed trial %s in Optuna: %s", trial_id, redact(str(exc)))
            return
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
            if state is TrialState.FAIL:
                self._failed().add(trial_id)
        except Exception as exc:  # noqa: BLE001 - keep the campaign going, but say why
            log.warning("could not record trial %s as %s in Optuna: %s", trial_id, state.name, redact(str(exc)))
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
