"""EvoPress's generations (Sieberling et al. 2024): many plans scored per stored trial, selected in stages.

A generation, with `search.generations` (offspring λ, stages, survivors):
1. Its parent is the best complete trial of the study at the budget (lowest loss; under a size budget, the best
   no larger than its ceiling; under a speed floor, `search.min_speed`, the best no slower than it, or while none
   is, the fastest), or the uniform allocation at the budget before there is one. The study's trials are read
   incrementally, so workers on one storage share their best.
2. λ offspring: level switches of the parent, one unit a level up and another one down: within groups of
   same-sized units for an average budget (`level_switches`), so each keeps it; anywhere for a size budget, kept
   when the plan stays under the ceiling (`SizeCeiling.mutate`). None is a plan the study holds or another
   offspring of this generation is. Under a speed floor an offspring's predicted speed (arithmetic on the
   runtime's speed table) must meet the floor, or, while the parent does not, beat the parent's.
   Speed as an objective is refused here (`search.objectives`): a generation selects by one value, the loss.
3. Selection in stages: the offspring and the parent are scored on the first windows of the fitness pool, the
   best `survivors[0]` go on to the next stage's windows (scored on the windows they lack only), and so on to the
   whole pool. The parent's losses on those windows come from its record (`stage_losses`), not a new score.
4. The candidates of the last stage that are new plans are recorded as complete trials, each in one storage call
   (`add_scored_trial`), with their parent and the number of scores the generation made. The best of them, if it
   beats the parent, is the study's best trial and so the next parent.

Workers record a plan once: each reads the study again and records its new plans under the study's recording
lock (`storage.recording_lock`), so of two workers that scored the same plan the second finds it recorded and drops
its copy. On PostgreSQL the lock is the database's (an advisory lock keyed by the study's name), so this holds for
workers on any machines sharing the study. On any other storage it is a file lock in the study's results folder,
which holds for the workers on one machine sharing that folder: every worker of a SQLite or journal-file study.

Only those trials are stored: no running trial, heartbeat or per-parameter write exists for the plans that lose a
stage. That is what keeps bookkeeping per evaluation small (benchmarks/overhead.py). A kill loses only the
unrecorded offspring of the generation in progress; the next run starts a generation from the best recorded trial
(every recorded survivor, hence every parent, is in the storage). The frontier, report and export read the
recorded trials as they read any other. A plan scored on part of the pool is never recorded: it is not comparable.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from autocompress.allocation import BudgetGrid, SizeCeiling, uniform_allocation
from autocompress.files import is_disk_full
from autocompress.measurement import combine_metrics
from autocompress.metrics import Metrics
from autocompress.plan import CompressionPlan
from autocompress.record import StudyRecord, TrialRecord, add_scored_trial, planned_params
from autocompress.search.evolution import level_switches
from autocompress.search.objective import Objective, failure_reason, stage_window
from autocompress.search.space import Params
from autocompress.search.storage import RecordingLock
from autocompress.search.study import study_size_ceiling
from autocompress.size import SizeReport
from autocompress.targets.base import Speed

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def selection_stages(pool: int, fractions: Sequence[float], survivors: Sequence[int]) -> list[tuple[int, int]]:
    """(windows, candidates kept) per stage, for a fitness pool of `pool` windows; fractions that round to the same
    number of windows are one stage, keeping the fewer candidates."""
    stages: dict[int, int] = {}
    for fraction, kept in zip(fractions, survivors, strict=True):
        stages[stage_window(pool, fraction)] = kept  # as the seeds' stages round, so their losses serve a parent
    return sorted(stages.items())


@dataclass
class Candidate:
    """One plan of a generation and what scoring it has measured so far (windows [0, windows) of the pool)."""

    levels: dict[str, int]  # unit -> level index on the budget grid
    params: Params
    number: int | None = None  # the trial that records it (the parent), None for a plan not recorded yet
    parts: list[Metrics] = field(default_factory=list)
    metrics: Metrics | None = None  # the parts combined
    windows: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # windows -> loss on them
    size: SizeReport | None = None
    stitch_s: float = 0.0
    eval_s: float = 0.0
    speed: Speed | None = None  # predicted, where the study has a speed floor


class AverageBudget:
    """An average sparsity or bit-width budget (`BudgetGrid`) as a generation mutates it: level switches within
    groups of same-sized units, from the uniform allocation."""

    def __init__(self, grid: BudgetGrid) -> None:
        self.grid = grid
        self.units = grid.units
        self.levels = dict.fromkeys(grid.units, grid.levels)

    def initial(self) -> dict[str, int]:
        return {unit: self.grid.index(level) for unit, level in uniform_allocation(self.grid).items()}

    def mutate(self, parent: dict[str, int], rng: random.Random, max_mutations: int) -> dict[str, int]:
        return level_switches(parent, self.grid, rng, max_mutations)

    def param(self, unit: str, key: str) -> str:
        return f"{unit}.{key}"


class GenerationSearch:
    """Runs generations on one study until it holds a number of finished trials (see the module docstring)."""

    def __init__(
        self, study: optuna.Study, objective: Objective, seed: int, recording_lock: RecordingLock = nullcontext
    ) -> None:
        self.study = study
        self.recording_lock = recording_lock  # shared by the workers that search the study (`record_new`)
        self.objective = objective
        self.space = objective.space
        self.settings = objective.config.search.generations
        record = StudyRecord.of(study)
        budget = record.config.search.budget
        self.ceiling: int | None = None  # a size budget's bytes, which a parent's recorded size must not exceed
        if budget.dimension == "size":
            self.budget: SizeCeiling | AverageBudget = study_size_ceiling(objective.session, self.space)
            self.ceiling = self.budget.ceiling
            key = self.space.precision_key
        else:
            levels = record.config.search.levels(budget.dimension)
            grid = BudgetGrid(record.units, levels, budget.average, record.unit_sizes)
            self.budget = AverageBudget(grid)
            key = budget.dimension
        self.names = {unit: self.budget.param(unit, key) for unit in self.budget.units}
        self.distributions = {name: self.space.distribution_of(name) for name in self.names.values()}
        pool = len(objective.session.pools.fitness)
        self.stages = selection_stages(pool, self.settings.stages, self.settings.survivors)
        self.rng = random.Random(seed)
        self.max_mutations = record.config.search.max_mutations
        self.max_failures = record.config.search.max_failures
        self.evaluations = 0  # scores this process made, one per candidate and stage
        self.plans = 0  # plans this process scored (on a first stage at least)
        self.recorded = 0  # trials this process recorded
        self.failures_in_a_row = 0
        self.stopped: str | None = None  # why it stopped after failures in a row, once it has
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._read_up_to = 0  # trials before this position are finished and read
        self._read: set[int] = set()
        self._finished: set[int] = set()
        self._seen: set[tuple[int, ...]] = set()
        self._best: TrialRecord | None = None
        self.min_tps = objective.min_tps  # a speed floor (search.min_speed), which a parent must also meet
        self._fastest: TrialRecord | None = None  # the parent while no trial meets the speed floor

    def run(self, n_trials: int, deadline: float, on_recorded: Callable[[int], None] = lambda count: None) -> None:
        """Generations until the study holds `n_trials` finished trials or `deadline` (time.monotonic) passes; after
        each generation `on_recorded` gets the number of trials it recorded."""
        while time.monotonic() < deadline:
            self.read_study()
            if self.finished_trials() >= n_trials:
                return
            recorded = self.generation(deadline)
            if recorded is None:
                return
            on_recorded(recorded)

    def finished_trials(self) -> int:
        """Complete and pruned trials as of the last read (Optuna sorts every trial on each read of the study)."""
        return len(self._finished)

    def read_study(self) -> None:
        """Take in the trials stored since the last read: the plans they hold, and the best complete one."""
        trials = self.study.get_trials(deepcopy=False)
        settled = True
        for position in range(self._read_up_to, len(trials)):
            trial = trials[position]
            finished = trial.state in FINISHED_STATES
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self._finished.add(trial.number)
            settled = settled and finished
            if settled:
                self._read_up_to = position + 1
            params = planned_params(trial)
            if trial.number in self._read or not all(name in params for name in self.names.values()):
                continue
            self._seen.add(self.key(params))
            if not finished:
                continue
            self._read.add(trial.number)
            record = TrialRecord.of(trial)
            if not record.scored or (self.ceiling is not None and record.size_bytes > self.ceiling):
                continue
            if self.min_tps is not None and record.predicted_decode_tps < self.min_tps:
                fastest = self._fastest
                if fastest is None or (-record.predicted_decode_tps, record.loss) < (
                    -fastest.predicted_decode_tps,
                    fastest.loss,
                ):
                    self._fastest = record
                continue
            if self._best is None or (record.loss, record.number) < (self._best.loss, self._best.number):
                self._best = record

    def levels_of(self, params: Params) -> dict[str, int]:
        return {unit: self.budget.levels[unit].index(params[name]) for unit, name in self.names.items()}

    def key(self, params: Params) -> tuple[int, ...]:
        return tuple(self.levels_of(params).values())

    def parent(self) -> Candidate:
        """The best complete trial within the budget (and the speed floor), with its losses on the stages' windows
        as recorded; while no trial meets the floor, the fastest within the budget; else the uniform plan at the
        budget."""
        best = self._best or self._fastest
        if best is None:
            return self.candidate(self.budget.initial())
        parent = self.candidate(self.levels_of(best.params))
        parent.number = best.number
        parent.losses = dict(best.stage_loss) | {len(self.objective.session.pools.fitness): best.loss}
        return parent

    def candidate(self, levels: dict[str, int]) -> Candidate:
        params = {self.names[unit]: self.budget.levels[unit][index] for unit, index in levels.items()}
        candidate = Candidate(levels, params)
        if self.objective.speed is not None:
            candidate.speed = self.objective.predicted_speed(self.space.plan_from_params(params))
        return candidate

    def fast_enough(self, child: Candidate, parent: Candidate) -> bool:
        """Under a speed floor, an offspring meets it, or (while the parent does not) is faster than the parent."""
        if self.min_tps is None:
            return True
        tps = child.speed.decode_tps
        return tps >= self.min_tps or tps > parent.speed.decode_tps

    def offspring(self, parent: Candidate) -> list[Candidate]:
        """λ level-switch mutations of the parent, each a plan neither the study nor this generation holds yet, and
        fast enough (`fast_enough`) under a speed floor."""
        children: list[Candidate] = []
        taken = set(self._seen) | {tuple(parent.levels.values())}
        for _ in range(self.settings.offspring):
            for _attempt in range(200):
                levels = self.budget.mutate(parent.levels, self.rng, self.max_mutations)
                if tuple(levels.values()) in taken:
                    continue
                taken.add(tuple(levels.values()))
                child = self.candidate(levels)
                if self.fast_enough(child, parent):
                    children.append(child)
                    break
        return children

    def generation(self, deadline: float) -> int | None:
        """One generation; the number of trials it recorded, or None when the search must stop (the deadline passed
        in the middle of it, or `max_failures` scores failed in a row)."""
        parent = self.parent()
        children = self.offspring(parent)
        if not children and parent.number is not None:
            print("autocompress: stopping: the study holds every plan a mutation of its best plan reaches", flush=True)
            return None
        candidates = [parent, *children]  # the parent first: it wins ties
        evaluations = 0
        for windows, kept in self.stages:
            scored = []
            for candidate in candidates:
                if windows not in candidate.losses:
                    if time.monotonic() >= deadline:
                        return None
                    evaluations += 1
                    if not self.score(candidate, windows):
                        if self.failures_in_a_row >= self.max_failures:
                            return None
                        continue
                scored.append(candidate)
            order = sorted(range(len(scored)), key=lambda index: (scored[index].losses[windows], index))
            candidates = [scored[index] for index in order[:kept]] if windows < self.stages[-1][0] else scored
        self.evaluations += evaluations
        return self.record_new(candidates, parent.number, evaluations)

    def record_new(self, candidates: Sequence[Candidate], parent: int | None, evaluations: int) -> int:
        """Record the candidates that are plans the study does not hold yet; how many. The study is read again, and
        the plans recorded, under the recording lock: a plan another worker recorded meanwhile is dropped here."""
        with self.recording_lock():
            self.read_study()
            new = [c for c in candidates if c.number is None and tuple(c.levels.values()) not in self._seen]
            for candidate in new:
                self.record(candidate, parent, evaluations)
        return len(new)

    def score(self, candidate: Candidate, windows: int) -> bool:
        """Score `candidate` on the windows it lacks up to `windows`; whether it could be scored."""
        session = self.objective.session
        try:
            plan: CompressionPlan = self.space.plan_from_params(candidate.params)
            measured = session.measure(plan, stages=[windows], start=candidate.windows)
            parts = [*candidate.parts, measured.metrics]
            metrics = combine_metrics(parts, session.pools.fitness.shape[1])
            loss = self.objective.loss_of(metrics)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the {self.objective.config.search.loss} loss is not finite ({loss})")
        except Exception as error:  # a plan that cannot be scored drops out of its generation, as a failed trial would
            if is_disk_full(error):  # but no plan can be scored until space is freed
                raise
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= self.max_failures:
                self.stopped = f"stopped after {self.max_failures} failed scores in a row; the last: " + failure_reason(
                    error
                )
            return False
        self.failures_in_a_row = 0
        self.plans += candidate.windows == 0
        candidate.parts, candidate.metrics, candidate.windows = parts, metrics, windows
        candidate.losses[windows] = loss
        candidate.size = measured.size
        candidate.stitch_s += measured.stitch_s
        candidate.eval_s += measured.eval_s
        return True

    def record(self, candidate: Candidate, parent: int | None, evaluations: int) -> None:
        fields = self.objective.outcome(
            candidate.metrics, candidate.size, candidate.stitch_s, candidate.eval_s, candidate.speed
        )
        fields |= {
            "stage_losses": sorted(candidate.losses.items()),
            "parent": parent,
            "generation_evaluations": evaluations,
            "worker": self.worker,
        }
        add_scored_trial(self.study, candidate.params, self.distributions, self.objective.values(fields), fields)
        self._seen.add(tuple(candidate.levels.values()))
        self.recorded += 1
