"""Study storages travel to other processes intact."""

from __future__ import annotations

import multiprocessing
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


def _open_after(barrier, url: str) -> None:
    barrier.wait()
    optuna.create_study(study_name="s", storage=open_storage(url), load_if_exists=True)


def test_processes_opening_a_new_sqlite_study_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'study.db'}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_open_after, args=(barrier, url)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert [study.study_name for study in optuna.get_all_study_summaries(open_storage(url))] == ["s"]
