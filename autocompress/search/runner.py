"""The local engine: a study's trials run in this process, on the model loaded here, by Optuna's optimize loop over
the Objective (or a generations search) until the study holds its number of finished trials; `driver.run_study`
does the rest."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.record import StudyLocation
from autocompress.search.driver import FINISHED, Engine, ProgressBar, StopAfterFailures, run_study
from autocompress.search.generations import GenerationSearch
from autocompress.search.heldout import Pending, judge_pending
from autocompress.search.objective import Objective, OptunaTrialContext
from autocompress.search.space import SearchSpace
from autocompress.search.storage import RecordingLock, recording_lock
from autocompress.search.study import check_budget, prepare_study, study_session


class LocalEngine(Engine):
    """Trials in this process, on the model loaded here: Optuna's optimize loop over the Objective, or a generations
    search (`search.generations`). `callbacks` run after each of this process's trials, beside the ones that stop and
    report the search."""

    def __init__(self, callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> None:
        self.callbacks = callbacks

    def load(self, config: Config, location: StudyLocation, progress: bool) -> SearchSpace:
        self.session, self.space = study_session(config, location.cache_dir, progress)
        check_budget(self.session, self.space)
        return self.space

    def prepare(self, study: optuna.Study, location: StudyLocation) -> None:
        prepare_study(study, self.session, self.space, location)
        self.recording_lock = recording_lock(location.storage_url, study.study_name, location.out_dir)

    def run(
        self,
        study: optuna.Study,
        n_trials: int,
        timeout: float | None,
        seed: int,
        bar: ProgressBar,
        max_bytes: int | None,
    ) -> None:
        objective = Objective(self.space.config, self.session, self.space, max_bytes)
        if objective.config.search.generations is not None:
            run_generations(study, objective, n_trials, timeout, seed, bar, self.callbacks, self.recording_lock)
            return
        failures = StopAfterFailures(objective.config.search.max_failures)
        with StopOnAFullDisk(objective) as disk_full:
            study.optimize(
                objective,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(n_trials, states=FINISHED),
                    failures,
                    disk_full,
                    bar,
                    *self.callbacks,
                ],
            )
        failures.raise_if_stopped(study)

    def judge(self, study: optuna.Study, pending: Pending) -> None:
        judge_pending(study, self.session, self.space, pending)


def run_search(
    config: Config,
    location: StudyLocation,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    write_reports: bool = True,
) -> optuna.Study:
    """Run (or continue) the study in this process until it holds `n_trials` finished (complete or pruned) trials
    or `timeout` seconds pass (`driver.run_study`).

    `callbacks` run after each of this process's trials, beside the ones that stop and report the search.
    `write_reports=False` leaves out the study's outputs (trials.csv, plots, report.md: `autocompress report`
    writes them later), so a machine without pandas and matplotlib can search.
    """
    return run_study(config, location, LocalEngine(callbacks), n_trials, timeout, progress, write_reports)


class StopOnAFullDisk:
    """A callback that stops the study once a trial failed for want of disk space (every later trial would too),
    used as a context that drops Optuna's own lines on that trial (a traceback): the command says it in one line."""

    LOGGER = "optuna.study._optimize"

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def filter(self, _record: logging.LogRecord) -> bool:
        return self.objective.disk_full is None

    def __enter__(self) -> StopOnAFullDisk:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_exception: object) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)
        if kind is None:
            self.objective.raise_if_disk_full()

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        if self.objective.disk_full is not None:
            study.stop()


def run_generations(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    timeout: float | None,
    seed: int,
    bar: ProgressBar,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    recording_lock: RecordingLock = nullcontext,
) -> GenerationSearch:
    """A generations search (`search.generations`): the enqueued seeds (baselines) first, as trials of their own
    through Optuna's loop (heartbeats and retries included), then generations until the study holds `n_trials`
    finished trials or `timeout` seconds pass; a UserError when it stops after `max_failures` in a row. The workers
    sharing `recording_lock` (`storage.recording_lock`) record each plan once (`GenerationSearch.record_new`)."""
    deadline = time.monotonic() + (math.inf if timeout is None else timeout)

    def seeds_waiting(study: optuna.Study) -> bool:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def stop_without_seeds(study: optuna.Study, _trial: FrozenTrial) -> None:
        if not seeds_waiting(study):  # another worker took the last one: this one would sample a trial of its own
            study.stop()

    def score_to_the_end(trial: optuna.Trial) -> float | tuple[float, float]:
        # A trial that found the last seed taken by another worker meanwhile is a sampled plan: scored whole, as the
        # seeds are, so that it is complete rather than pruned by a frontier of a few seeds.
        context = OptunaTrialContext(trial)
        context.is_seed = True
        return objective.score(objective.space.plan_for(trial), context)

    # A seed whose process was killed stays RUNNING until its heartbeat is found stale, which Optuna checks only
    # when a trial starts: check now, so that the retry is WAITING before seeds are looked for.
    optuna.storages.fail_stale_trials(study)
    if seeds_waiting(study):
        failures = StopAfterFailures(objective.config.search.max_failures)
        with StopOnAFullDisk(objective) as disk_full:
            study.optimize(
                score_to_the_end,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[failures, disk_full, bar, *callbacks, stop_without_seeds],
            )
        failures.raise_if_stopped(study)
    search = GenerationSearch(study, objective, seed, recording_lock)
    search.run(n_trials, deadline, on_recorded=lambda count: bar.add(study, count))
    if search.evaluations:
        print(
            f"autocompress: this process scored {search.evaluations} candidates in generations and recorded "
            f"{search.recorded} of them as trials",
            flush=True,
        )
    if search.stopped is not None:
        raise UserError(f"study {study.study_name!r} {search.stopped}")
    return search
