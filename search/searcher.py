"""Optuna inside Ray Tune, with the trial states Optuna should see.

Ray's ``OptunaSearch`` tells Optuna COMPLETE for trials that ASHA stopped early (with their
low-fidelity value). ``StateAwareOptunaSearch`` tells PRUNED for those (their intermediate
values stay), FAIL for errored or non-finite trials, and stores the Tune trial id as a user
attribute so Optuna trials map back to Tune trials and MLflow runs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import optuna
from optuna.trial import TrialState

if TYPE_CHECKING:
    from search.optuna_search import StateAwareOptunaSearch

log = logging.getLogger(__name__)

TRIAL_ID_ATTR = "tune_trial_id"
START_POINT_ATTR = "starting_point"


def __getattr__(name: str):
    """``StateAwareOptunaSearch`` lives in ``search.optuna_search`` (it imports Ray Tune, ~2 s):
    read-only commands import this module for storages and trial states without paying for Ray."""
    if name == "StateAwareOptunaSearch":
        from search.optuna_search import StateAwareOptunaSearch

        return StateAwareOptunaSearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:///")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return SqliteStorage(url, heartbeat_interval=None)
    return optuna.storages.RDBStorage(url, heartbeat_interval=None)


def storage_exists(url: str) -> bool:
    """False only for a file storage (``sqlite:///``, ``journal:///``) whose file is missing, so
    read-only commands can say "no trials yet" instead of creating an empty database."""
    if url.startswith("journal:///"):
        return Path(url.removeprefix("journal:///")).expanduser().is_file()
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database  # drops ?timeout=... and knows sqlite+pysqlite://
        return not database or database == ":memory:" or Path(database).expanduser().is_file()
    return True


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


def trial_state(result: dict | None, error: bool, max_epochs: int) -> TrialState:
    """COMPLETE only for a trial that trained its full budget and stayed finite."""
    if error or (result and result.get("failure_reason")):
        return TrialState.FAIL
    if not result or int(result.get("epoch", 0)) < max_epochs:
        return TrialState.PRUNED
    return TrialState.COMPLETE


def build_searcher(define_by_run: Callable, starting_points: list[dict], start_point_names: list[str],
                   study_name: str, storage_url: str, seed: int, max_epochs: int,
                   sampler: str = "tpe", study_attrs: dict | None = None) -> "StateAwareOptunaSearch":
    from search.optuna_search import StateAwareOptunaSearch

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


_SECRET_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
# a bare token as the user part of an http(s) URI: https://TOKEN@host
_TOKEN_USER = re.compile(r"(?P<scheme>https?://)(?P<tok>[^:/@\s]{16,})@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:[A-Za-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|signature|credential)[A-Za-z0-9_.-]*))="
    r"(?P<val>[^&#\s]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide credentials in URIs: ``user:pw@`` passwords, bare ``https://TOKEN@`` tokens and
    secret-looking query parameters (``?token=...``, ``&X-Amz-Signature=...``)."""
    text = _SECRET_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _TOKEN_USER.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}=***", text)
