"""Budget-aware search: an Optuna sampler that only proposes plans at the study's budget (EvoPress-style).

EvoPress (Sieberling et al. 2024) searches per-layer compression levels at a fixed total size with a
(1 + λ) evolution: each offspring is its parent with a few *level switches* (one unit one level up, another
unit of the same size one level down, so the size does not change), offspring are scored on few tokens
first and on more only if they look competitive, and the best one replaces the parent.

Here that loop is an Optuna sampler, so its trials land in the study like any other (frontier, report,
resume, concurrent workers unchanged), and staged fitness (`Objective`) plays the multi-step selection:
an offspring whose partial loss is clearly worse than the best plan's is pruned early.
- The parent of each new trial is the best complete trial of the study (lowest loss; all have one size).
  The sampler keeps no other state, so a resumed or concurrent search continues from the study alone.
- An offspring makes min(U, U') level switches, U, U' uniform in 1..`max_mutations` (as EvoPress, biased
  towards one), each within a group of units of one size (`allocation.unit_groups`; the sizes are kept in
  the study by `prepare_study`, else units are grouped by name), and is never a plan the study has tried.
- Before any trial completes, the parent is the uniform allocation at the budget.
What the sampler needs (units, levels, budget, unit sizes) it reads from the study's record, so it is built from
the config alone (`sampler_for`).
"""

from __future__ import annotations

import random

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial

from autocompress.allocation import BudgetGrid, uniform_allocation
from autocompress.record import StudyRecord, TrialRecord


class BudgetEvolutionSampler(optuna.samplers.BaseSampler):
    """Level-switch mutations of the best plan so far; every proposed plan keeps the budget exactly."""

    def __init__(self, seed: int | None = None, max_mutations: int = 3, attempts: int = 200) -> None:
        self._rng = random.Random(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self.max_mutations = max_mutations
        self.attempts = attempts
        self._layout: tuple[str, BudgetGrid] | None = None

    def layout(self, study: optuna.Study) -> tuple[str, BudgetGrid]:
        """The budget dimension and its grid, from the study's record."""
        if self._layout is None:
            try:
                record = StudyRecord.of(study)
            except KeyError as error:
                raise RuntimeError("the evolution sampler needs a study created by autocompress") from error
            budget = record.config.search.budget
            if budget is None:
                raise RuntimeError("the evolution sampler needs a study with a budget")
            levels = record.config.search.levels(budget.dimension)
            self._layout = budget.dimension, BudgetGrid(record.units, levels, budget.average, record.unit_sizes)
        return self._layout

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        dimension, grid = self.layout(study)
        return {f"{unit}.{dimension}": CategoricalDistribution(grid.levels) for unit in grid.units}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, float]:
        if not search_space:
            return {}
        dimension, grid = self.layout(study)
        names = {unit: f"{unit}.{dimension}" for unit in grid.units}
        trials = study.get_trials(deepcopy=False)
        scored = [
            record
            for record in map(TrialRecord.of, trials)
            if record.scored and all(name in record.params for name in names.values())
        ]
        if scored:
            best = min(scored, key=lambda record: (record.loss, record.number))
            parent = {unit: grid.index(best.params[name]) for unit, name in names.items()}
        else:
            parent = {unit: grid.index(level) for unit, level in uniform_allocation(grid).items()}
        seen = {self._key(t.params, names) for t in trials if all(n in t.params for n in names.values())}
        child = parent
        for _ in range(self.attempts):
            child = self.mutate(parent, grid)
            if self._key({names[u]: grid.level(i) for u, i in child.items()}, names) not in seen:
                break
        return {names[unit]: grid.level(index) for unit, index in child.items()}

    @staticmethod
    def _key(params: dict, names: dict[str, str]) -> tuple:
        return tuple(round(float(params[name]), 9) for name in names.values())

    def mutate(self, parent: dict[str, int], grid: BudgetGrid) -> dict[str, int]:
        return level_switches(parent, grid, self._rng, self.max_mutations, self.attempts)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> object:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()


def level_switches(
    parent: dict[str, int], grid: BudgetGrid, rng: random.Random, max_mutations: int, attempts: int = 200
) -> dict[str, int]:
    """`parent` (unit -> level index) with min(U, U') level switches, U, U' uniform in 1..`max_mutations`, each
    one unit of a group of same-sized units one level up and another one down, so every group keeps its sum."""
    child = dict(parent)
    count = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))
    groups = [group for group in grid.groups if len(group) > 1]
    made = 0
    for _ in range(attempts):
        if made == count or not groups:
            break
        group = rng.choice(groups)
        up = rng.choice(group)
        downs = [unit for unit in group if unit != up and child[unit] > 0]
        if child[up] >= grid.top or not downs:
            continue
        down = rng.choice(downs)
        child[up] += 1
        child[down] -= 1
        made += 1
    return child
