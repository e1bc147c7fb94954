"""Optuna storages from `make_storage`: SQLite in WAL mode (kept across pickling, as Tune pickles
the searcher) and the `journal:///` file form; relative paths pinned to the launch directory."""

from __future__ import annotations

import pickle
import sqlite3

import optuna

from search.campaign import Campaign
from search.runner import _absolute_stores
from search.searcher import SqliteStorage, make_storage


def _pragmas(storage) -> tuple[str, int]:
    with storage.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        cur = raw.cursor()
        mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
        sync = cur.execute("PRAGMA synchronous").fetchone()[0]
    return mode, sync


def test_sqlite_storage_uses_wal_and_normal_sync_also_after_pickling(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}"
    storage = make_storage(url)
    assert isinstance(storage, SqliteStorage)
    assert _pragmas(storage) == ("wal", 1)  # 1 = NORMAL (the default is 2 = FULL)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 1.0})
    trial = study.ask()
    trial.suggest_float("x", 0, 2)
    study.tell(trial, 0.5)

    restored = pickle.loads(pickle.dumps(storage))
    assert _pragmas(restored) == ("wal", 1)
    again = optuna.load_study(study_name="s", storage=restored)
    assert [t.params for t in again.trials] == [{"x": 1.0}]
    with sqlite3.connect(tmp_path / "sub" / "optuna.db") as conn:  # the file itself is in WAL mode
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_journal_storage_round_trip(tmp_path):
    url = f"journal:///{tmp_path / 'j' / 'optuna.journal'}"
    study = optuna.create_study(study_name="s", storage=make_storage(url))
    trial = study.ask()
    trial.suggest_int("k", 0, 3)
    study.tell(trial, 1.0)
    assert (tmp_path / "j" / "optuna.journal").is_file()
    again = optuna.load_study(study_name="s", storage=make_storage(url))  # a fresh reader replays the log
    assert len(again.trials) == 1 and again.trials[0].value == 1.0


def test_relative_store_paths_are_pinned_to_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}]}
    for given, expected in (("journal:///rel/o.journal", f"journal:///{tmp_path}/rel/o.journal"),
                            ("sqlite:///o.db", f"sqlite:///{tmp_path}/o.db"),
                            ("postgresql://u@h/db", "postgresql://u@h/db")):
        campaign = _absolute_stores(Campaign.model_validate({**base, "optuna_storage": given}))
        assert campaign.optuna_storage == expected


def test_read_only_lookups_never_create_the_database(tmp_path):
    """`search status` / reports on a campaign whose Optuna file is gone: no trials, no new file."""
    from search.runner import target_result
    from search.searcher import storage_exists

    for url in (f"sqlite:///{tmp_path / 'optuna.db'}", f"journal:///{tmp_path / 'optuna.journal'}"):
        campaign = Campaign.model_validate({"name": "ro", "dataset": "digits",
                                            "targets": [{"arch": "demo_net", "bits": "w4a4"}], "optuna_storage": url})
        assert not storage_exists(url)
        res = target_result(campaign, campaign.targets[0])
        assert res.best_val_top1 is None and res.counts == {}
        assert list(tmp_path.iterdir()) == []
    assert storage_exists("postgresql://user@host/db")  # servers are asked, not guessed
    (tmp_path / "optuna.db").touch()
    assert storage_exists(f"sqlite:///{tmp_path / 'optuna.db'}?timeout=60")  # URL parameters are not the path
    assert storage_exists(f"sqlite+pysqlite:///{tmp_path / 'optuna.db'}")
    assert not storage_exists(f"sqlite+pysqlite:///{tmp_path / 'other.db'}")
