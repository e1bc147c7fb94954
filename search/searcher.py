"""Optuna inside Ray Tune, with the trial states Optuna should see.

Ray's ``OptunaSearch`` tells Optuna COMPLETE for trials that ASHA stopped early (with their
low-fidelity value). ``StateAwareOptunaSearch`` tells PRUNED for those (their intermediate
values stay), FAIL for errored or non-finite trials, and stores the Tune trial id as a user
attribute so Optuna trials map back to Tune trials and MLflow runs. The Ray-importing searcher
class itself lives in ``search.optuna_search``, so read-only commands never import Ray.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import optuna
from optuna.trial import TrialState

if TYPE_CHECKING:
    from search.optuna_search import StateAwareOptunaSearch

from search import uris
from search.uris import redact  # noqa: F401 - re-exported for older imports

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """``StateAwareOptunaSearch`` lives in ``search.optuna_search`` (it imports Ray Tune, ~2 s):
    read-only commands import this module for storages and trial states without paying for Ray."""
    if name == "StateAwareOptunaSearch":
        from search.optuna_search import StateAwareOptunaSearch

        return StateAwareOptunaSearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

TRIAL_ID_ATTR = "tune_trial_id"
START_POINT_ATTR = "starting_point"


def make_sampler(seed: int, kind: str = "tpe", startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """Seeded multivariate TPE (constant_liar keeps concurrent trials apart) that models after
    ``startup_trials`` random ones, or random search."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=startup_trials)


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


def trial_state(result: dict | None, error: bool, max_epochs: int) -> TrialState:
    """COMPLETE only for a trial that trained its full budget and stayed finite."""
    if error or (result and result.get("failure_reason")):
        return TrialState.FAIL
    if not result or int(result.get("epoch", 0)) < max_epochs:
        return TrialState.PRUNED
    return TrialState.COMPLETE


def build_searcher(define_by_run: Callable, starting_points: list[dict], start_point_names: list[str],
                   study_name: str, storage_url: str, seed: int, max_epochs: int,
                   sampler: str = "tpe", study_attrs: dict | None = None,
                   startup_trials: int = 10) -> "StateAwareOptunaSearch":
    from search.optuna_search import StateAwareOptunaSearch

    return StateAwareOptunaSearch(
        space=define_by_run,
        metric="val_top1",
        mode="max",
        points_to_evaluate=[dict(p) for p in starting_points] or None,
        sampler=make_sampler(seed, sampler, startup_trials),
        study_name=study_name,
        storage=make_storage(storage_url),
        max_epochs=max_epochs,
        start_point_names=start_point_names,
        study_attrs=study_attrs,
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
