"""Study storages travel to other processes intact, and the lock under which generation workers record a plan
serializes them wherever they share the study."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from autocompress.search.storage import SQLiteStorage, open_storage, recording_lock
from tests.conftest import POSTGRES_URL, needs_postgres


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


def open_from_four_processes_at_once(url: str) -> None:
    """Four processes create (or load) study "s" at `url` at the same moment; all succeed, and there is one study."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_open_after, args=(barrier, url)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert [study.study_name for study in optuna.get_all_study_summaries(open_storage(url))] == ["s"]


def test_processes_opening_a_new_sqlite_study_at_once_all_succeed(tmp_path: Path) -> None:
    open_from_four_processes_at_once(f"sqlite:///{tmp_path / 'new' / 'study.db'}")


@needs_postgres
def test_processes_opening_a_new_postgresql_database_at_once_all_succeed() -> None:
    """Workers started together on a database without Optuna's tables race to create them; none may fail."""
    import sqlalchemy

    name = f"autocompress_new_{uuid.uuid4().hex[:8]}"
    server = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        open_from_four_processes_at_once(url)
    finally:
        sqlalchemy.orm.close_all_sessions()
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
        server.dispose()


@pytest.mark.parametrize(
    "url", [pytest.param("sqlite", id="sqlite"), pytest.param(POSTGRES_URL, id="postgresql", marks=needs_postgres)]
)
def test_a_trial_added_whole_reads_back_as_optuna_would_have_written_it(tmp_path: Path, url: str) -> None:
    """A generation records a plan in one `add_trial`, its parameters and attributes written in bulk."""
    url = f"sqlite:///{tmp_path / 'study.db'}" if url == "sqlite" else url
    name = f"whole-{uuid.uuid4().hex[:8]}"
    distributions = {f"u{index}.sparsity": CategoricalDistribution([0.3, 0.4, 0.5]) for index in range(210)}
    params = {key: [0.3, 0.4, 0.5][index % 3] for index, key in enumerate(distributions)}
    attrs = {"loss": 0.25, "stage_losses": [[1, 0.3], [4, 0.25]], "parent": 7}
    trial = optuna.trial.create_trial(
        params=params, distributions=distributions, values=[0.25, 0.5], user_attrs=attrs, constraints={"c": -1.0}
    )
    study = optuna.create_study(study_name=name, storage=open_storage(url), directions=["minimize", "minimize"])
    try:
        study.add_trial(trial)
        study.add_trial(trial)
        for number, stored in enumerate(optuna.load_study(study_name=name, storage=open_storage(url)).trials):
            assert stored.number == number and stored.state == TrialState.COMPLETE
            assert stored.params == params and stored.distributions == distributions
            assert stored.user_attrs == attrs and stored.values == [0.25, 0.5]
            assert stored.constraints == {"c": -1.0}
    finally:
        optuna.delete_study(study_name=name, storage=url)


@needs_postgres
def test_the_recording_lock_of_a_postgresql_study_serializes_workers_with_no_common_folder(tmp_path: Path) -> None:
    """Generation workers on several machines share only the database: its lock serializes each study's recording
    (a worker waits while another holds it), and the lock of another study does not wait."""
    name = f"locked-{uuid.uuid4().hex[:8]}"
    holder = recording_lock(POSTGRES_URL, name, tmp_path / "machine-a")
    waiter = recording_lock(POSTGRES_URL, name, tmp_path / "machine-b")
    other_study = recording_lock(POSTGRES_URL, f"other-{name}", tmp_path / "machine-b")
    events: list[str] = []
    held = threading.Event()

    def hold() -> None:
        with holder():
            held.set()
            time.sleep(1.0)
            events.append("holder releases")

    def wait() -> None:
        held.wait(10)
        with waiter():
            events.append("waiter holds")

    threads = [threading.Thread(target=hold), threading.Thread(target=wait)]
    for thread in threads:
        thread.start()
    assert held.wait(10)
    began = time.monotonic()
    with other_study():
        assert time.monotonic() - began < 0.5, "another study's lock is free while this one's is held"
    for thread in threads:
        thread.join(30)
    assert events == ["holder releases", "waiter holds"]


def test_the_recording_lock_of_a_study_on_one_machine_is_a_file_beside_it(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'study.db'}", f"journal:{tmp_path / 'study.log'}"):
        with recording_lock(url, "s", tmp_path / "s")() as lock:
            assert lock.lock_file == str(tmp_path / "s" / ".record.lock")
