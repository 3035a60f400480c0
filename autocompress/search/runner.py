"""Running a study on this machine: Optuna's optimize loop over the Objective until the study holds its number of
finished trials, then held-out judging of the frontier and the study's outputs."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.frontier import frontier_of
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, scored_records
from autocompress.search.generations import GenerationSearch
from autocompress.search.heldout import heldout_pending, judge_pending
from autocompress.search.objective import Objective, OptunaTrialContext
from autocompress.search.study import (
    check_before_loading,
    check_budget,
    open_study,
    prepare_study,
    sampler_for,
    study_session,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward n_trials: pruned ones too (staged fitness)


def complete_count(study: optuna.Study) -> int:
    """Trials finished: complete, or pruned by staged fitness (failed ones are re-run, so they do not count)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class ProgressBar:
    """A bar over complete trials toward the number wanted, showing the best objective and the frontier size.

    The best objective and the frontier need every stored trial, so they are read again at most every
    `SUMMARY_SECONDS`: read after each trial, they cost more than a fast trial once a study holds thousands."""

    SUMMARY_SECONDS = 10.0

    def __init__(self, study: optuna.Study, n_trials: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=n_trials, initial=min(complete_count(study), n_trials), desc="trials", disable=not enabled
        )
        self.n_trials = n_trials
        self.finished = self.bar.n
        self.summarized_at = -math.inf

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.add(study, int(trial.state in FINISHED))

    def add(self, study: optuna.Study, finished: int) -> None:
        """Count `finished` more trials of this process (a summary counts every process's)."""
        self.finished += finished
        if not self.bar.disable and time.monotonic() - self.summarized_at >= self.SUMMARY_SECONDS:
            self.summarized_at = time.monotonic()
            self.finished = complete_count(study)
            records = scored_records(study)
            if records:
                best = min(record.objective for record in records)
                self.bar.set_postfix(best=f"{best:.4f}", frontier=len(frontier_of(records)))
        self.bar.n = min(self.finished, self.n_trials)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class StopAfterFailures:
    """Stop the search when `limit` trials fail in a row, saying why the last one failed: a plan that cannot be
    scored once will not be scored 500 times."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.stopped: str | None = None  # why the search stopped, once it has

    def failed(self, record: TrialRecord) -> bool:
        """Count `record`; whether the search must stop now."""
        self.in_a_row = self.in_a_row + 1 if record.state == TrialState.FAIL else 0
        if self.in_a_row < self.limit:
            return False
        reason = record.fail_reason or "no reason recorded"
        self.stopped = f"stopped after {self.limit} failed trials in a row; the last: {reason}"
        return True

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.failed(TrialRecord.of(trial)):
            study.stop()


def run_search(
    config: Config,
    location: StudyLocation,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    write_reports: bool = True,
) -> optuna.Study:
    """Run (or continue) the study until it holds `n_trials` finished (complete or pruned) trials or `timeout`
    seconds pass.

    `callbacks` run after each of this process's trials, beside the ones that stop and report the search.
    `write_reports=False` leaves out the study's outputs (trials.csv, plots, report.md: `autocompress report`
    writes them later), so a machine without pandas and matplotlib can search.
    """
    n_trials = config.search.n_trials if n_trials is None else n_trials
    timeout = config.search.timeout if timeout is None else timeout
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our bar reports trials; Optuna's lines would bury it
    check_before_loading(config, location)
    session, space = study_session(config, location.cache_dir, progress)
    check_budget(session, space)
    study, created = open_study(config, location, space, config.search.seed)
    seed = config.search.seed if created else config.search.seed + os.getpid()
    if not created:  # another process's sampler must not replay this one's suggestions
        study.sampler = sampler_for(config, seed)
    prepare_study(study, session, space, location)
    max_bytes = StudyRecord.of(study).max_bytes()
    objective = Objective(config, session, space, max_bytes)
    bar = ProgressBar(study, n_trials, progress)
    try:
        if complete_count(study) < n_trials:
            if config.search.generations is not None:
                run_generations(study, objective, n_trials, timeout, seed, bar, callbacks)
            else:
                failures = StopAfterFailures(config.search.max_failures)
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
                            *callbacks,
                        ],
                    )
                if failures.stopped is not None:  # raised after the outputs of what was scored are written
                    raise UserError(f"study {study.study_name!r} {failures.stopped}")
    finally:
        bar.close()
        judge_pending(study, session, space, heldout_pending(study, space, max_bytes))
        if write_reports:
            from autocompress.report import write_outputs  # pandas and matplotlib: for the outputs alone

            write_outputs(study, location)
    return study


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
) -> GenerationSearch:
    """A generations search (`search.generations`): the enqueued seeds (baselines) first, as trials of their own
    through Optuna's loop (heartbeats and retries included), then generations until the study holds `n_trials`
    finished trials or `timeout` seconds pass; a UserError when it stops after `max_failures` in a row."""
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
        if failures.stopped is not None:
            raise UserError(f"study {study.study_name!r} {failures.stopped}")
    search = GenerationSearch(study, objective, seed)
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
