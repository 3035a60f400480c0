"""One study's flow, whichever engine executes its trials: checked before its model loads, opened or created,
prepared once, its trials run until it holds enough, its frontier judged on held-out tokens, its outputs written.

An `Engine` supplies only what differs between engines: where the model that scores plans is loaded and how the
trials are executed. The local engine is `search/runner.py`, the Ray Tune one `search/ray_backend.py`."""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.frontier import frontier_of
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, scored_records
from autocompress.search.heldout import Pending, heldout_pending
from autocompress.search.space import SearchSpace
from autocompress.search.study import check_before_loading, open_study, sampler_for

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward n_trials: pruned ones too (staged fitness)


def complete_count(study: optuna.Study) -> int:
    """Trials finished: complete, or pruned by staged fitness (failed ones are re-run, so they do not count)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class ProgressBar:
    """A bar toward the end of the search: its time limit when it has one (a search that runs until its time is
    up, as the main job's does, would show a bar stuck near 0 of its 1000 trials), else the number of finished
    trials wanted; beside it the trials finished, the best objective and the frontier size.

    The best objective and the frontier need every stored trial, so they are read again at most every
    `SUMMARY_SECONDS`: read after each trial, they cost more than a fast trial once a study holds thousands."""

    SUMMARY_SECONDS = 10.0

    def __init__(self, study: optuna.Study, n_trials: int, enabled: bool, timeout: float | None = None) -> None:
        self.n_trials = n_trials
        self.timeout = timeout
        self.began = time.monotonic()
        self.finished = min(complete_count(study), n_trials)
        if timeout is None:
            self.bar = tqdm(total=n_trials, initial=self.finished, desc="trials", disable=not enabled)
        else:
            self.bar = tqdm(
                total=math.ceil(timeout),
                desc="search",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s{postfix}",
                disable=not enabled,
            )
        self.summary: dict[str, str | int] = {}
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
                self.summary = {"best": f"{best:.4f}", "frontier": len(frontier_of(records))}
        if self.timeout is None:
            self.bar.n = min(self.finished, self.n_trials)
            self.bar.set_postfix(self.summary, refresh=False)
        else:
            self.bar.n = min(math.floor(time.monotonic() - self.began), self.bar.total)
            self.bar.set_postfix({"trials": self.finished, **self.summary}, refresh=False)
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

    def raise_if_stopped(self, study: optuna.Study) -> None:
        """Say in one line why the search stopped, once the trials it ran are recorded."""
        if self.stopped is not None:
            raise UserError(f"study {study.study_name!r} {self.stopped}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.failed(TrialRecord.of(trial)):
            study.stop()


class Engine(ABC):
    """How a study's trials are executed, and where the model that scores them is loaded; `run_study` does the
    rest. The driver calls `load`, `prepare`, `run` (unless the study holds its trials already), `judge` (when a
    plan lacks its held-out figures) and, whatever happened, `close`."""

    @abstractmethod
    def load(self, config: Config, location: StudyLocation, progress: bool) -> SearchSpace:
        """Load the model with its token pools and the study's caches, refuse a budget no plan can meet (before the
        study is created under a name that would keep it), and return the search space over the model's units."""

    @abstractmethod
    def prepare(self, study: optuna.Study, location: StudyLocation) -> None:
        """Write into `study` what it computes once before its trials (`study.prepare_study`)."""

    @abstractmethod
    def run(
        self,
        study: optuna.Study,
        n_trials: int,
        timeout: float | None,
        seed: int,
        bar: ProgressBar,
        max_bytes: int | None,
    ) -> None:
        """Run trials, sampled with `seed`, until `study` holds `n_trials` finished ones or `timeout` seconds pass,
        counting each on `bar`; a UserError when the search stops itself (`search.max_failures` failed trials in a
        row, a full disk)."""

    @abstractmethod
    def judge(self, study: optuna.Study, pending: Pending) -> None:
        """Record in `study` the held-out figures of the `pending` plans (`heldout.heldout_figures`)."""

    def close(self) -> None:  # noqa: B027 - most engines hold nothing beyond what Python frees
        """Release what `load` took (Ray: the cluster it started)."""


def run_study(
    config: Config,
    location: StudyLocation,
    engine: Engine,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    write_reports: bool = True,
) -> optuna.Study:
    """Run (or continue) the study on `engine` until it holds `n_trials` finished (complete or pruned) trials or
    `timeout` seconds pass, then judge its frontier on held-out tokens and write its outputs (unless
    `write_reports` is False: `autocompress report` writes them later), also when the search stopped on an error."""
    n_trials = config.search.n_trials if n_trials is None else n_trials
    timeout = config.search.timeout if timeout is None else timeout
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our bar reports trials; Optuna's lines would bury it
    check_before_loading(config, location)
    try:
        space = engine.load(config, location, progress)
        study, created = open_study(config, location, space, config.search.seed)
        seed = config.search.seed if created else config.search.seed + os.getpid()
        if not created:  # another process's sampler must not replay this one's suggestions
            study.sampler = sampler_for(config, seed)
        engine.prepare(study, location)
        record = StudyRecord.of(study)
        max_bytes, min_tps = record.max_bytes(), record.min_tps()
        bar = ProgressBar(study, n_trials, progress, timeout)
        try:
            if complete_count(study) < n_trials:
                engine.run(study, n_trials, timeout, seed, bar, max_bytes)
        finally:
            bar.close()
            pending = heldout_pending(study, space, max_bytes, min_tps)
            if pending:
                engine.judge(study, pending)
            if write_reports:
                from autocompress.report import write_outputs  # pandas and matplotlib: for the outputs alone

                write_outputs(study, location)
    finally:
        engine.close()
    return study
