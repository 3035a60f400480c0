"""Study storage: SQLite by default, any SQLAlchemy URL (PostgreSQL), or an Optuna journal file."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.distributions import distribution_to_json
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from autocompress.errors import UserError

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
MAX_RETRIES = 3
TABLE_CREATION_ATTEMPTS = 4
# PostgreSQL's codes for "duplicate table" and "duplicate object": another worker created it first.
CREATED_CONCURRENTLY = frozenset({"42P07", "42710"})


def masked_url(url: str) -> str:
    """`url` with the password of its user (postgresql://user:PASSWORD@host/db) replaced by ***, for printing."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def default_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{study_dir / 'study.db'}"


class StudyStorage(RDBStorage):
    """RDBStorage that writes a trial created from a template (`study.add_trial`: how a generation records each
    plan it scored on the whole fitness pool) with its parameters and user attributes in bulk.

    Optuna writes them one at a time, each with its own queries (the trial looked up again, the parameter's earlier
    distribution read, an upsert per attribute): about 1 ms each on SQLite, 0.2 s for a plan of 210 units. Here they
    are added to the same transaction at once. The per-parameter check against earlier trials' distributions is not
    repeated: a recorded plan's distributions are the study's own (`SearchSpace.distribution_of`), and a resumed
    study must match its fingerprint.
    """

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None, session) -> object:
        if template_trial is None:
            return super()._get_prepared_new_trial(study_id, template_trial, session)
        from optuna.storages._rdb import models

        bare = copy.copy(template_trial)
        bare.params, bare.distributions, bare.user_attrs = {}, {}, {}
        trial = super()._get_prepared_new_trial(study_id, bare, session)
        session.add_all(
            models.TrialParamModel(
                trial_id=trial.trial_id,
                param_name=name,
                param_value=template_trial.distributions[name].to_internal_repr(value),
                distribution_json=distribution_to_json(template_trial.distributions[name]),
            )
            for name, value in template_trial.params.items()
        )
        session.add_all(
            models.TrialUserAttributeModel(trial_id=trial.trial_id, key=key, value_json=json.dumps(value))
            for key, value in template_trial.user_attrs.items()
        )
        return trial

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (running, their last heartbeat older than the grace period), and running trials
        with no heartbeat at all that started longer than the grace period ago: a process killed before its
        heartbeat thread's first write leaves such a trial, which Optuna would leave RUNNING forever."""
        from optuna.storages._rdb import models

        stale = super()._get_stale_trial_ids(study_id)
        grace = timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
        with _create_scoped_session(self.scoped_session, True) as session:
            silent = (
                session.query(models.TrialModel)
                .filter(models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialModel.study_id == study_id)
                .filter(~models.TrialModel.heartbeats.any())
                .all()
            )
            # Optuna stamps a trial's start with this machine's local clock, not the database's
            started = {trial.trial_id: trial.datetime_start for trial in silent}
        now = datetime.now()
        return stale + [trial_id for trial_id, start in started.items() if start is not None and now - start > grace]


class SQLiteStorage(StudyStorage):
    """RDBStorage for SQLite, safe for several processes on one machine.

    SQLite ignores SELECT ... FOR UPDATE, so two processes could both see a trial WAITING and both start it.
    A file lock beside the database makes Optuna's check-and-set of a trial's state atomic.
    """

    def __init__(self, url: str, **kwargs: object) -> None:
        self._state_lock = self._lock_for(url)
        with self._state_lock:  # two processes opening a new file would both create its tables
            super().__init__(url, **kwargs)

    @staticmethod
    def _lock_for(url: str) -> FileLock:
        return FileLock(url.removeprefix("sqlite:///") + ".lock")

    # Pickled to reach other processes (Ray workers, `n_jobs` pools) as RDBStorage is; a lock does not pickle.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_state_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._state_lock = self._lock_for(self.url)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with self._state_lock:
            return super().set_trial_state_values(trial_id, state, values)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> BaseStorage:
    """An Optuna storage for `url`. RDB storages get heartbeats: a killed process's trial is re-run."""
    if url.startswith("journal:") or url.endswith(JOURNAL_SUFFIXES):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    heartbeat = {}
    if heartbeat_interval is not None:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        }
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    storage_class = SQLiteStorage if url.startswith("sqlite:///") else StudyStorage
    attempt = 1
    while True:
        try:
            return storage_class(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together on a new database race to create its tables; the loser's DDL is rolled
            # back (a unique violation, or PostgreSQL's "relation already exists"), and the tables are there when
            # it looks again.
            lost_the_race = isinstance(error, sqlalchemy.exc.IntegrityError) or (
                getattr(error.orig, "pgcode", None) in CREATED_CONCURRENTLY
            )
            if not lost_the_race or attempt == TABLE_CREATION_ATTEMPTS:
                raise unopenable(url, error) from error
            time.sleep(0.5 * attempt)
            attempt += 1
        except Exception as error:  # SQLAlchemy raises many types for bad URLs and unreachable servers
            raise unopenable(url, error) from error


RecordingLock = Callable[[], AbstractContextManager[object]]


def recording_lock(storage_url: str, study_name: str, out_dir: Path) -> RecordingLock:
    """The lock under which generation workers check a study for a plan and record it, so that each plan is
    recorded once: a new context manager per call, held for one check-and-record.

    On PostgreSQL it is the database's own (`advisory_lock`), so it serializes workers on every machine sharing the
    study. For any other storage it is a file lock in the results folder `out_dir`, which serializes the processes
    on this machine that share that folder: all of them for SQLite and journal files, which live on one machine;
    workers on several machines sharing another server database (MySQL) are not serialized."""
    if storage_url.split(":", 1)[0].split("+", 1)[0] == "postgresql":
        return advisory_lock(storage_url, study_name)
    path = out_dir / ".record.lock"
    return lambda: FileLock(path)


def advisory_lock(storage_url: str, study_name: str) -> RecordingLock:
    """A PostgreSQL transaction-level advisory lock keyed by the study's name, taken on a connection of its own.

    Transaction-level, so the server releases it whenever the transaction ends: at commit, at rollback on an error,
    or with the connection when the process dies; a session-level lock is released only by an explicit unlock or
    the end of the session. The key is a 64-bit hash of the name, stable across processes and machines (unlike
    Python's `hash`); the prefix keeps it apart from other applications' advisory locks on the same database."""
    digest = hashlib.blake2b(f"autocompress.record:{study_name}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)

    @contextmanager
    def locked() -> Iterator[None]:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield

    return locked


def unopenable(url: str, error: BaseException) -> UserError:
    """The one line for a storage that cannot be opened, its password masked (the driver's message may quote it)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"storage {masked_url(url)!r} cannot be opened: {masked_url(reason)}")


def load_study(name: str, storage: BaseStorage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as error:
        known = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
        raise UserError(f"no study named {name!r} in that storage; it has: {', '.join(known) or 'none'}") from error
