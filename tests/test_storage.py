"""Study storages travel to other processes intact."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna

from autocompress.search.storage import SQLiteStorage, open_storage


def test_a_sqlite_storage_pickles_with_its_state_lock_and_heartbeats(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url, heartbeat_interval=5, grace_period=10)
    optuna.create_study(study_name="s", storage=storage).optimize(lambda trial: trial.suggest_float("x", 0, 1), 2)

    copy = pickle.loads(pickle.dumps(storage))

    assert isinstance(copy, SQLiteStorage)
    assert copy._state_lock.lock_file == str(tmp_path / "study.db.lock")
    assert copy.get_heartbeat_interval() == 5
    assert len(optuna.load_study(study_name="s", storage=copy).trials) == 2
