"""Optuna inside Ray Tune, with the trial states Optuna should see.

Ray's ``OptunaSearch`` tells Optuna COMPLETE for trials that ASHA stopped early (with their
low-fidelity value). ``StateAwareOptunaSearch`` tells PRUNED for those (their intermediate
values stay), FAIL for errored or non-finite trials, and stores the Tune trial id as a user
attribute so Optuna trials map back to Tune trials and MLflow runs.
"""

from __future__ import annotations

import logging
from typing import Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search import uris
from search.uris import redact  # noqa: F401 - re-exported for older imports

log = logging.getLogger(__name__)

TRIAL_ID_ATTR = "tune_trial_id"
START_POINT_ATTR = "starting_point"


def make_sampler(seed: int, kind: str = "tpe") -> optuna.samplers.BaseSampler:
    """Seeded multivariate TPE (constant_liar keeps concurrent trials apart), or random search."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage *instance* (OptunaSearch refuses URL strings).

    ``sqlite:///`` gets WAL journaling with ``synchronous=NORMAL`` (see ``SqliteStorage``);
    ``journal:///path`` is Optuna's append-only journal file, the fastest for large campaigns;
    any other SQLAlchemy URL (postgresql://, mysql://) goes to ``RDBStorage`` as it is.
    """
    journal = uris.journal_file(url)
    if uris.MASK in url:
        return _MaskedRDBStorage(url)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend

        path = journal.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if uris.is_sqlite(url):
        db = uris.sqlite_file(url)
        if db is not None:
            db.resolve().parent.mkdir(parents=True, exist_ok=True)
        return SqliteStorage(url, heartbeat_interval=None)
    return optuna.storages.RDBStorage(url, heartbeat_interval=None)


def storage_exists(url: str) -> bool:
    """False only for a file storage (``sqlite:///``, ``journal:///``) whose file is missing, so
    read-only commands can say "no trials yet" instead of creating an empty database."""
    return uris.store_exists(url)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SqliteStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` on SQLite with write-ahead logging and ``synchronous=NORMAL``.

    Define-by-run commits every ``suggest_*`` separately (about 20 commits per ask and tell).
    In the default rollback-journal mode each commit waits for fsyncs; in WAL mode with NORMAL,
    only checkpoints do. That halves Optuna's ask latency at 1,000 trials (docs/BENCHMARKS.md).
    A crash of the process loses nothing, and a power loss can lose only the last commits; the
    database stays consistent. WAL needs a local filesystem, which the driver's store is.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._install_pragmas()

    def __setstate__(self, state):  # Tune pickles the searcher with its storage
        super().__setstate__(state)
        self._install_pragmas()

    def _install_pragmas(self) -> None:
        import sqlalchemy

        sqlalchemy.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.engine.dispose()  # connections opened while creating the tables lack the pragmas


class _MaskedRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage on a URI whose credentials are kept out of pickles (Tune's searcher state)."""

    def __init__(self, masked_url: str):
        super().__init__(uris.reveal(masked_url), heartbeat_interval=None)
        self._masked_url = masked_url

    def __getstate__(self):
        state = super().__getstate__()
        state["url"] = self._masked_url
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["url"] = uris.reveal(state["url"])
        super().__setstate__(state)


class StateAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records ASHA-stopped trials as PRUNED and failed ones as FAIL."""

    def __init__(self, *args, max_epochs: int, start_point_names: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._start_point_names = list(start_point_names or [])
        self._suggested = 0

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


def trial_state(result: dict | None, error: bool, max_epochs: int) -> TrialState:
    """COMPLETE only for a trial that trained its full budget and stayed finite."""
    if error or (result and result.get("failure_reason")):
        return TrialState.FAIL
    if not result or int(result.get("epoch", 0)) < max_epochs:
        return TrialState.PRUNED
    return TrialState.COMPLETE


def build_searcher(define_by_run: Callable, starting_points: list[dict], start_point_names: list[str],
                   study_name: str, storage_url: str, seed: int, max_epochs: int,
                   sampler: str = "tpe") -> StateAwareOptunaSearch:
    return StateAwareOptunaSearch(
        space=define_by_run,
        metric="val_top1",
        mode="max",
        points_to_evaluate=[dict(p) for p in starting_points] or None,
        sampler=make_sampler(seed, sampler),
        study_name=study_name,
        storage=make_storage(storage_url),
        max_epochs=max_epochs,
        start_point_names=start_point_names,
    )


def fail_orphaned_trials(storage_url: str, study_name: str, known_trial_ids: set[str],
                         include_waiting: bool = False) -> int:
    """Mark RUNNING Optuna trials that Tune no longer knows (driver killed) as FAIL; with
    ``include_waiting`` also WAITING ones (starting points a killed driver had enqueued)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage_url))
    except KeyError:
        return 0
    count = 0
    states = (TrialState.RUNNING, TrialState.WAITING) if include_waiting else (TrialState.RUNNING,)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.user_attrs.get(TRIAL_ID_ATTR) in known_trial_ids:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "failure_reason", "orphaned: the driver stopped before Tune saved this trial")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        count += 1
    return count
