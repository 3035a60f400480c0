"""The Ray Tune backend: Ray schedules trials over a cluster, Optuna samples them into the study's own storage.

`RayEngine` is its `driver.Engine`: `run_study` drives the study's flow as for the local backend. The driver owns
the study. `StudySearcher` is Ray Tune's `OptunaSearch` bound to the very `optuna.Study` that
`open_study` created (same storage, same name, the configured sampler), so the uniform seeds enqueued there are
asked first, and every trial Tune runs is an ordinary trial of that study: `frontier`, `report`, `export`, a
local `search` or an Optuna `worker` see no difference. Ray workers never open the storage. Each scores the
driver's suggested plan with the same `Objective.score` as the local backend, in a `RayTrialContext` (the study's
trials as the driver saw them when it asked, the trial's record collected), reports the record, and the driver
writes it into the study with `record.write_fields` before `tell`, as the local backend writes its own.

A worker process builds its `CompressionSession` (model, token pools, calibration statistics and the dense
reference, both read from the study's cache folder) once and keeps it for every later trial: Tune reuses
trial actors, and the session is cached in this module per process. A student distilled on one worker is kept
in that cache folder too, so the other workers and the held-out judging load it instead of training it again.

Failures: an exception inside the Objective fails the trial with its reason, as in the local backend; a worker
process or node that dies makes Tune re-run the trial (FailureConfig). While the driver lives it keeps the
heartbeat of each trial it asked; if it is killed, those trials go stale and the next process that works on
the study (a restarted driver, or an Optuna worker) re-runs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.study import StudyDirection
from optuna.trial import TrialState

from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.frontier import frontier_of
from autocompress.record import (
    HeldoutFigures,
    StudyLocation,
    StudyRecord,
    TrialRecord,
    TrialWriter,
    planned_params,
    record_heldout,
    seed_of,
    trial_records,
    write_fields,
)
from autocompress.search.driver import Engine, ProgressBar, StopAfterFailures, complete_count, run_study
from autocompress.search.heldout import Pending, heldout_figures
from autocompress.search.objective import Objective, failure_reason
from autocompress.search.space import SearchSpace
from autocompress.search.storage import MAX_RETRIES
from autocompress.search.study import check_budget, prepare_study, study_session

# RAY_AIR_NEW_OUTPUT=0: with verbose=0 Tune prints nothing; our bar shows the study's progress
RAY_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"}
for _key, _value in RAY_ENVIRONMENT.items():  # before Ray starts; a user's own settings win
    os.environ.setdefault(_key, _value)

try:
    import ray
    from ray import tune
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.utils import flatten_dict
except ImportError:  # run_ray_search says how to install it
    ray = None
    OptunaSearch = object

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # the backend passes only small configs through the object store
TRIAL_KEY = "optuna_trial"  # the config entry that carries the Optuna trial number to the worker
CONTEXT_KEY = "optuna_context"  # and the one (JSON) with the trial's user attributes and the study's frontier
RESULT_KEY = "autocompress"  # the reported entry that carries the recorded trial (JSON)


def value_keys(count: int) -> list[str]:
    """The reported entries that carry a trial's `count` objective values, one per direction of the study."""
    return [f"value_{index}" for index in range(count)]


def peer_snapshot(study: optuna.Study, max_bytes: int | None) -> list[dict]:
    """The trials a worker's scoring compares with: the frontier (staged fitness) and every trial with a KD curve
    (student pruners), without their parameters. A snapshot taken at ask time can only be older than the live
    study, so it prunes no trial that the live study would have kept."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    records = trial_records(study, states)
    chosen = {record.number: record for record in frontier_of(records, max_bytes)}
    chosen |= {record.number: record for record in records if record.kd_curve}
    return [record.model_copy(update={"params": {}}).model_dump(mode="json") for record in chosen.values()]


class RayTrialContext:
    """A trial scored in a Ray worker: its peers as the driver saw them, its record kept for the driver to write."""

    def __init__(self, number: int, is_seed: bool, peers: list[TrialRecord]) -> None:
        self.number = number
        self.is_seed = is_seed
        self._peers = peers
        self.writer = TrialWriter()
        self.intermediate: list[tuple[int, float]] = []

    def peers(self) -> list[TrialRecord]:
        return list(self._peers)

    def report(self, value: float, step: int) -> bool:
        self.intermediate.append((step, float(value)))
        return False  # the study's pruner runs on the driver, which sees the intermediate values only at the end

    def payload(self, state: str, values: list[float] | None) -> dict:
        """What the driver writes: state (COMPLETE, PRUNED or FAIL), values, record fields, intermediate values."""
        return {"state": state, "values": values, "fields": self.writer.fields, "intermediate": self.intermediate}


def failed_payload(reason: str) -> dict:
    context = RayTrialContext(-1, False, [])
    context.writer.write(fail_reason=reason)
    return context.payload("FAIL", None)


@dataclass(frozen=True)
class WorkerSetup:
    """All a Ray worker needs to score plans: the study's config and its cache folder (a shared path)."""

    config: dict
    cache_dir: str
    fingerprint: str | None = None  # the study's search space; a worker whose model differs refuses to score
    max_bytes: int | None = None  # the study's size limit
    directions: int = 1  # how many objective values a trial reports: the study's directions

    @property
    def key(self) -> str:
        return json.dumps([self.config, self.cache_dir], sort_keys=True)


_WORKER_STATE: dict[str, Any] = {}  # per process: the session, space and Objective for one WorkerSetup


def session_for(setup: WorkerSetup):
    """This process's CompressionSession for `setup` (built on first use, then reused by every trial)."""
    if _WORKER_STATE.get("key") != setup.key:
        _WORKER_STATE.clear()
        config = Config.model_validate(setup.config)
        session, space = study_session(config, Path(setup.cache_dir))
        _WORKER_STATE.update(key=setup.key, config=config, session=session, space=space)
        _WORKER_STATE["objective"] = Objective(config, session, space, setup.max_bytes)
    if setup.fingerprint is not None and _WORKER_STATE["space"].fingerprint() != setup.fingerprint:
        raise RuntimeError(
            f"the model on this worker ({os.uname().nodename}) does not match the study's search space; "
            "give every node the same model and data"
        )
    return _WORKER_STATE["session"], _WORKER_STATE["space"], _WORKER_STATE["objective"]


def score_trial(config: dict, setup: WorkerSetup) -> None:
    """The Tune function trainable: score one plan with the study's Objective and report what it recorded."""
    _session, space, objective = session_for(setup)  # outside the try: a broken worker is Tune's to retry
    asked = json.loads(config.get(CONTEXT_KEY, "{}"))
    params = {key: value for key, value in config.items() if key not in (TRIAL_KEY, CONTEXT_KEY)}
    peers = [TrialRecord.model_validate(peer) for peer in asked.get("peers", [])]
    context = RayTrialContext(config.get(TRIAL_KEY, -1), bool(asked.get("seed")), peers)
    values: list[float] | None = None
    try:
        returned = objective.score(space.plan_from_params(params), context)
        values, state = (list(returned) if isinstance(returned, tuple | list) else [returned]), "COMPLETE"
    except optuna.TrialPruned:  # staged fitness: hopeless after a partial evaluation
        state = "PRUNED"
    except Exception as error:  # the plan's fault, not the worker's: the trial fails with its reason
        if "fail_reason" not in context.writer.fields:
            context.writer.write(fail_reason=failure_reason(error))
        state = "FAIL"
    keys = value_keys(setup.directions)  # all of them, NaN for a trial without values: Tune checks they are there
    metrics = dict.fromkeys(keys, math.nan) | dict(zip(keys, values or [], strict=False))
    tune.report(metrics | {RESULT_KEY: json.dumps(context.payload(state, values)), "node": os.uname().nodename})


class StudyPreparer:
    """A Ray actor with a trial's resources for what a study computes once, before its trials."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.session = None
        self.space: SearchSpace | None = None

    def describe(self) -> dict:
        """Load the model and data (proving a worker can), refuse a budget no plan can meet, fill the cache folder,
        and name the model's units."""
        config = Config.model_validate(self.setup.config)
        self.session, self.space = study_session(config, Path(self.setup.cache_dir))
        space = self.space
        check_budget(self.session, space)  # before the driver creates the study under a name that would keep it
        self.session.weights.prepare()  # what every stitch needs (a database is built by `prepare`, block by block)
        self.session.reference("fitness")
        return {"units": space.units, "unit_levels": space.unit_levels}

    def prepare(self, name: str, directions: list[str], user_attrs: dict[str, Any]) -> dict:
        """Run the local backend's `prepare_study` against a copy of the study's attributes; return what it
        added (user attributes, trials enqueued) for the driver to write into the study."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        copy = optuna.create_study(directions=directions)  # in memory
        for key, value in user_attrs.items():
            copy.set_user_attr(key, value)
        with tempfile.TemporaryDirectory() as scratch:
            prepare_study(copy, self.session, self.space, StudyLocation(name, Path(scratch), "memory"))
        added = {
            key: value for key, value in copy.user_attrs.items() if key not in user_attrs or user_attrs[key] != value
        }
        enqueued = [
            {"params": planned_params(trial), "user_attrs": trial.user_attrs}
            for trial in copy.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        ]
        return {"user_attrs": added, "enqueued": enqueued}


def judge(setup: WorkerSetup, pending: Pending) -> dict[int | None, HeldoutFigures]:
    """On a worker: held-out figures of the plans the driver names (trial number, None for dense -> params)."""
    config = Config.model_validate(setup.config)
    session, space = study_session(config, Path(setup.cache_dir))
    return {
        number: heldout_figures(session, space, None if number is None else params)
        for number, params in pending.items()
    }


class DefineSpace:
    """OptunaSearch's define-by-run space: the SearchSpace's own suggestions, plus the trial number for logs."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> dict:
        self.space.plan_for(trial)
        return {TRIAL_KEY: trial.number}


def trial_dirname(trial) -> str:
    return f"trial_{trial.config.get(TRIAL_KEY, 'x')}_{trial.trial_id}"


class StudySearcher(OptunaSearch):
    """OptunaSearch over the autocompress study itself, recording trials exactly as the local backend does.

    Runs on the driver. Asks stop once the study holds `n_trials` complete trials (counting every process's),
    after `deadline`, or after too many failures in a row; stale trials of dead processes are failed and
    re-enqueued before each ask, as `study.optimize` does.
    """

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        n_trials: int,
        deadline: float | None = None,
        bar=None,
        max_bytes: int | None = None,
        storage_url: str | None = None,
    ) -> None:
        metric = value_keys(len(study.directions))
        mode = ["min" if direction == StudyDirection.MINIMIZE else "max" for direction in study.directions]
        several = len(metric) > 1
        super().__init__(
            space=DefineSpace(space),
            metric=metric if several else metric[0],
            mode=mode if several else mode[0],
            sampler=study.sampler,
            study_name=study.study_name,
            storage=study._storage,
        )
        self._ot_study = study  # the one create_study just loaded is the same study; keep ours
        self.n_trials = n_trials
        self.deadline = deadline
        self.bar = bar or (lambda *_: None)
        self.max_bytes = max_bytes
        self.failures = StopAfterFailures(space.config.search.max_failures)
        self.stopped = False
        self._beating: threading.Event | None = None
        self.storage_url = storage_url  # to reopen the study where a pickled copy of this searcher runs

    # -- asking ---------------------------------------------------------------------------------
    def suggest(self, trial_id: str):
        self._start_heartbeats()
        if self.stopped or (self.deadline is not None and time.time() >= self.deadline):
            return Searcher.FINISHED
        optuna.storages.fail_stale_trials(self._ot_study)
        done = complete_count(self._ot_study)
        if done >= self.n_trials:
            return Searcher.FINISHED
        if done + len(self.in_flight()) >= self.n_trials:
            return None  # enough are running; ask again when one ends (it may fail)
        with warnings.catch_warnings():  # heartbeats are ours to record here, not study.optimize's
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            config = super().suggest(trial_id)
        trial = self._ot_trials[trial_id]
        self._beat(trial)  # at once: a trial without a heartbeat never goes stale
        context = {"seed": seed_of(trial), "peers": peer_snapshot(self._ot_study, self.max_bytes)}
        return config | {CONTEXT_KEY: json.dumps(context)}

    def in_flight(self) -> dict[str, optuna.Trial]:
        return {key: trial for key, trial in self._ot_trials.items() if key not in self._completed_trials}

    # -- telling --------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing to do: a trial reports once, and its completion writes it."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        flat = flatten_dict(result or {})
        recorded = json.loads(flat[RESULT_KEY]) if RESULT_KEY in flat else None
        if recorded is None:
            reason = (
                "the Ray worker failed on every attempt (see the Tune trial's error.txt)"
                if error
                else "stopped by Ray Tune before it was scored"
            )
            recorded = failed_payload(reason)
        self.write(trial, recorded)

    def write(self, trial: optuna.Trial, recorded: dict) -> None:
        study = self._ot_study
        try:
            write_fields(trial, recorded["fields"])
            for step, value in recorded.get("intermediate", []):
                trial.report(value, step)
            values = recorded["values"]
            if recorded["state"] == "COMPLETE":
                study.tell(trial, values if len(values) > 1 else values[0])
            else:
                study.tell(trial, state=TrialState[recorded["state"]])
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another process judged it stale and failed it; its retry is in the study
        except (ValueError, TypeError, NotImplementedError) as error:  # what Optuna refuses, it records as FAIL
            write_fields(trial, {"fail_reason": failure_reason(error)})
            study.tell(trial, state=TrialState.FAIL)
        frozen = study._storage.get_trial(trial._trial_id)
        if self.failures.failed(TrialRecord.of(frozen)):
            self.stopped = True
        self.bar(study, frozen)

    def close(self, reason: str) -> None:
        """Fail the trials still running (the driver is leaving) and stop their heartbeats."""
        for trial_id, trial in self.in_flight().items():
            self._completed_trials.add(trial_id)
            self.write(trial, failed_payload(reason))
        if self._beating is not None:
            self._beating.set()

    # -- heartbeats: the driver vouches for the trials it asked, as study.optimize does for its own --
    def _heartbeat_interval(self) -> int | None:
        return getattr(self._ot_study._storage, "get_heartbeat_interval", lambda: None)()

    def _beat(self, trial: optuna.Trial) -> None:
        if not self._heartbeat_interval():
            return
        try:
            self._ot_study._storage.record_heartbeat(trial._trial_id)
        except Exception:  # a missed beat only risks a retry of the trial; keep beating
            logging.getLogger(__name__).warning("heartbeat of trial %s failed", trial.number)

    def _start_heartbeats(self) -> None:
        interval = self._heartbeat_interval()
        if self._beating is not None or not interval:
            return
        self._beating = threading.Event()

        def beat(stop: threading.Event) -> None:
            while not stop.wait(interval):
                for trial_id, trial in list(self._ot_trials.items()):  # copied at once: the driver adds
                    if trial_id not in self._completed_trials:
                        self._beat(trial)

        threading.Thread(target=beat, args=(self._beating,), daemon=True, name="study-heartbeats").start()

    # -- Tune checkpoints: the study storage is the state; a restarted driver resumes from it ----------
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        raise UserError("resume a study by running `autocompress search` again, not with Tuner.restore")

    def __getstate__(self) -> dict:
        """Tune pickles its searcher (to restore it, or to run it on the cluster under Ray Client): the copy
        carries the study's name and storage URL, not the open storage, threads or progress bar."""
        state = self.__dict__.copy()
        state.update(_beating=None, bar=None, _ot_study=None, _storage=None, _ot_trials={}, _completed_trials=set())
        return state

    def __setstate__(self, state: dict) -> None:
        from autocompress.search.storage import load_study, open_storage

        self.__dict__.update(state)
        self.bar = lambda *_: None
        if self.storage_url is not None:
            search = self._space.space.config.search
            self._storage = open_storage(self.storage_url, search.heartbeat_interval, search.grace_period)
            self._ot_study = load_study(self._study_name, self._storage)
            self._ot_study.sampler = self._sampler


def connect(address: str | None, quiet: bool) -> bool:
    """Join the Ray cluster at `address`, or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    logging_level = logging.WARNING if quiet else logging.INFO
    try:
        if address in (None, "local"):
            ray.init(
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging_level,
            )
        else:  # workers on other machines do not inherit this environment: pass on autocompress's own settings
            forwarded = {key: value for key, value in os.environ.items() if key.startswith("AUTOCOMPRESS_")}
            ray.init(
                address=address,
                log_to_driver=not quiet,
                logging_level=logging_level,
                runtime_env={"env_vars": forwarded} if forwarded else None,
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({str(error).splitlines()[0]})") from error
    return True


def resources_per_trial(cpus: float, gpus: float | None) -> dict[str, float]:
    if gpus is None:  # one GPU per trial where the cluster has GPUs, none otherwise
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if cpus <= 0 and gpus <= 0:
        raise UserError("a trial needs some resources: --cpus-per-trial or --gpus-per-trial above 0")
    return {"cpu": cpus, "gpu": gpus}


def default_concurrency(resources: dict[str, float]) -> int:
    """As many trials as the cluster's CPUs and GPUs hold at once."""
    available = ray.cluster_resources()
    fits = []
    if resources["cpu"] > 0:
        fits.append(int(available.get("CPU", 0) // resources["cpu"]))
    if resources["gpu"] > 0:
        fits.append(int(available.get("GPU", 0) // resources["gpu"]))
    return max(1, min(fits))


def remote_result(reference):
    """The result of a Ray task or actor call; a UserError it raised stays a one-line UserError here."""
    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from error
        raise


def remote_call(function, resources: dict[str, float], *args):
    """Run `function` once on a worker with a trial's resources (a GPU task's process exits after: Ray's default)."""
    return remote_result(ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(function).remote(*args))


def write_prepared(study: optuna.Study, location: StudyLocation, prepared: dict) -> None:
    """Write what `StudyPreparer.prepare` added into the study, once, as `prepare_study` would have."""
    with FileLock(location.out_dir / ".study.lock"):
        if not StudyRecord.of(study).baselines:  # no other process enqueued the baselines meanwhile
            for trial in prepared["enqueued"]:
                study.enqueue_trial(trial["params"], user_attrs=trial["user_attrs"], skip_if_exists=True)
        for key, value in prepared["user_attrs"].items():
            study.set_user_attr(key, value)


class RayEngine(Engine):
    """Trials on a Ray cluster (joined at `address`, or started here and stopped on `close`): the model is loaded by
    the workers alone, a `StudyPreparer` prepares the study, Tune runs the trials through a `StudySearcher`, and a
    worker judges the frontier."""

    def __init__(
        self,
        address: str | None,
        cpus_per_trial: float,
        gpus_per_trial: float | None,
        concurrency: int | None,
        max_failures: int,
    ) -> None:
        self.address = address
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.concurrency = concurrency
        self.max_failures = max_failures  # Tune's retries of a trial whose worker died
        self.started = False
        self.preparer = None

    def load(self, config: Config, location: StudyLocation, progress: bool) -> SearchSpace:
        if not progress:
            logging.getLogger("ray").setLevel(logging.WARNING)
        self.started = connect(self.address, quiet=not progress)
        self.location = location
        resources = self.resources = resources_per_trial(self.cpus_per_trial, self.gpus_per_trial)
        self.setup = WorkerSetup(config.model_dump(mode="json"), str(location.cache_dir.resolve()))
        self.preparer = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(StudyPreparer).remote(
            self.setup
        )
        described = remote_result(self.preparer.describe.remote())
        self.space = SearchSpace(config, described["units"], described["unit_levels"])
        return self.space

    def prepare(self, study: optuna.Study, location: StudyLocation) -> None:
        directions = [direction.name.lower() for direction in study.directions]
        try:
            prepared = remote_result(self.preparer.prepare.remote(location.name, directions, study.user_attrs))
        finally:
            self.release_preparer()  # frees its GPU for the trials
        write_prepared(study, location, prepared)

    def release_preparer(self) -> None:
        if self.preparer is not None:
            ray.kill(self.preparer)
            self.preparer = None

    def run(
        self,
        study: optuna.Study,
        n_trials: int,
        timeout: float | None,
        seed: int,
        bar: ProgressBar,
        max_bytes: int | None,
    ) -> None:
        # the sampler seeded with `seed` is the study's own, which the searcher asks
        deadline = None if timeout is None else time.time() + timeout
        location, space = self.location, self.space
        searcher = StudySearcher(study, space, n_trials, deadline, bar, max_bytes, location.storage_url)
        try:
            scoring = replace(
                self.setup, fingerprint=space.fingerprint(), max_bytes=max_bytes, directions=len(study.directions)
            )
            trainable = tune.with_parameters(score_trial, setup=scoring)
            tuner = tune.Tuner(
                tune.with_resources(trainable, self.resources),
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=-1,  # the searcher stops asking at the study's n_trials
                    max_concurrent_trials=self.concurrency or default_concurrency(self.resources),
                    reuse_actors=True,  # a worker keeps its session for the next trial
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=f"{location.name}-{datetime.now():%Y%m%d-%H%M%S}",
                    storage_path=str((location.out_dir / "ray").resolve()),
                    failure_config=tune.FailureConfig(max_failures=self.max_failures),
                    verbose=0,
                ),
            )
            tuner.fit()
        finally:
            searcher.close("the Ray driver stopped before the trial was scored")
        searcher.failures.raise_if_stopped(study)

    def judge(self, study: optuna.Study, pending: Pending) -> None:
        for number, figures in remote_call(judge, self.resources, self.setup, pending).items():
            record_heldout(study, number, figures)

    def close(self) -> None:
        self.release_preparer()  # when the study could not be opened, or the driver was stopped while preparing
        if self.started:
            ray.shutdown()


def run_ray_search(
    config: Config,
    location: StudyLocation,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    *,
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    concurrency: int | None = None,
    max_failures: int = MAX_RETRIES,
) -> optuna.Study:
    """Run (or continue) the study on Ray Tune until it holds `n_trials` complete trials or `timeout` passes
    (`driver.run_study`)."""
    if ray is None:
        raise UserError("--backend ray needs Ray Tune: pip install -e '.[ray]'")
    if config.search.generations is not None:
        raise UserError(
            "search.generations runs on the local backend: a generation's candidates are scored in turn on one "
            "resident model; run several `autocompress worker` processes on one storage to scale it out"
        )
    if address is not None and address.startswith("ray://") and location.storage_url.startswith("sqlite"):
        raise UserError(
            "with a ray:// address the search runs on the cluster; give a --storage both sides reach (postgresql://...)"
        )
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    if cpus_per_trial < 0 or (gpus_per_trial or 0) < 0 or max_failures < 0:
        raise UserError("--cpus-per-trial, --gpus-per-trial and --max-failures cannot be negative")
    engine = RayEngine(address, cpus_per_trial, gpus_per_trial, concurrency, max_failures)
    return run_study(config, location, engine, n_trials, timeout, progress)
