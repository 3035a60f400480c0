"""Allocations at a budget (uniform, OWL, sensitivity) and the budget-aware evolutionary search."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from pydantic import ValidationError

from autocompress.allocation import (
    BudgetGrid,
    SizeCeiling,
    average_level,
    owl_allocation,
    sensitivity_allocation,
    uniform_allocation,
    unit_groups,
)
from autocompress.config import Config, SearchConfig
from autocompress.errors import UserError
from autocompress.record import StudyRecord, TrialRecord
from autocompress.search import SearchSpace, StudyLocation, run_search
from autocompress.search.evolution import BudgetEvolutionSampler
from autocompress.session import CompressionSession
from tests.conftest import random_text

BLOCKS = [f"model.layers.{index}" for index in range(6)]
LINEARS = [f"model.layers.{index}.{name}" for index in range(3) for name in ("self_attn.q_proj", "mlp.down_proj")]


def test_units_of_one_shape_form_a_group() -> None:
    assert unit_groups(BLOCKS) == [BLOCKS]
    assert unit_groups(LINEARS) == [LINEARS[0::2], LINEARS[1::2]]
    sizes = {unit: 2 if "q_proj" in unit or unit.endswith("layers.2.mlp.down_proj") else 6 for unit in LINEARS}
    assert unit_groups(LINEARS, sizes) == [[*LINEARS[0::2], LINEARS[5]], LINEARS[1:5:2]]  # by size, when known


def test_uniform_allocation_alternates_between_levels_when_the_budget_is_between_two() -> None:
    grid = BudgetGrid(BLOCKS, [2, 3, 4, 5], 3.5)
    allocation = uniform_allocation(grid)
    assert sorted(allocation.values()) == [3, 3, 3, 4, 4, 4]
    assert [allocation[unit] for unit in BLOCKS] == [3, 4, 3, 4, 3, 4]
    assert grid.respects(allocation)
    assert set(uniform_allocation(BudgetGrid(BLOCKS, [0.4, 0.5, 0.6], 0.5)).values()) == {0.5}


def test_a_budget_the_levels_cannot_meet_exactly_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be met exactly"):
        BudgetGrid(BLOCKS, [0.4, 0.5, 0.6], 0.43)
    with pytest.raises(ValueError, match="evenly spaced"):
        BudgetGrid(BLOCKS, [2, 3, 4, 8], 3)


@pytest.mark.parametrize(
    ("dimension", "levels", "target"), [("sparsity", [0.3, 0.4, 0.5, 0.6, 0.7], 0.5), ("bits", [2, 3, 4], 3.0)]
)
def test_owl_keeps_the_budget_and_spares_the_units_with_more_outliers(dimension, levels, target) -> None:
    ratios = dict(zip(BLOCKS, [0.010, 0.002, 0.004, 0.030, 0.001, 0.006], strict=True))
    grid = BudgetGrid(BLOCKS, levels, target)
    allocation = owl_allocation(ratios, grid, dimension, spread=0.1 if dimension == "sparsity" else 1.0)
    assert grid.respects(allocation)
    assert sum(allocation.values()) / len(BLOCKS) == pytest.approx(target)
    assert len(set(allocation.values())) > 1
    by_outliers = [allocation[unit] for unit in sorted(BLOCKS, key=ratios.get)]
    compression = by_outliers if dimension == "sparsity" else [-value for value in by_outliers]
    assert compression == sorted(compression, reverse=True), "more outliers, never more compression"


def test_the_sensitivity_allocation_is_the_best_one_at_the_budget() -> None:
    levels = [0.2, 0.4, 0.6]
    units = BLOCKS[:4]
    costs = [[0.0, 0.1, 0.9], [0.0, 0.5, 0.6], [0.0, 0.05, 0.2], [0.0, 0.3, 2.0]]
    profile = {unit: dict(zip(levels, row, strict=True)) for unit, row in zip(units, costs, strict=True)}
    grid = BudgetGrid(units, levels, 0.4)
    allocation = sensitivity_allocation(profile, grid)
    assert grid.respects(allocation)
    feasible = [
        combo for combo in itertools.product(levels, repeat=4) if grid.respects(dict(zip(units, combo, strict=True)))
    ]
    best = min(sum(profile[unit][level] for unit, level in zip(units, combo, strict=True)) for combo in feasible)
    assert sum(profile[unit][allocation[unit]] for unit in units) == pytest.approx(best)


def test_evolution_mutations_keep_every_group_sum() -> None:
    grid = BudgetGrid(LINEARS, [0.2, 0.4, 0.6, 0.8], 0.6)
    sampler = BudgetEvolutionSampler(seed=0, max_mutations=3)
    parent = {unit: grid.index(level) for unit, level in uniform_allocation(grid).items()}
    changed = 0
    for _ in range(200):
        child = sampler.mutate(parent, grid)
        assert grid.respects({unit: grid.level(index) for unit, index in child.items()})
        changed += child != parent
        parent = child
    assert changed > 150


def test_a_plan_over_a_size_ceiling_is_fitted_under_it_by_the_smallest_step_down() -> None:
    levels = {unit: ["q4", "q5", "q8"] for unit in ("a", "b", "c")}
    unit_bytes = {"a": [0, 100, 400], "b": [0, 10, 40], "c": [0, 30, 90]}
    over = {"a": 2, "b": 2, "c": 2}  # 530 bytes beyond the fixed 1,000
    ceiling = SizeCeiling(levels, unit_bytes, 1_000, 1_505)
    assert ceiling.fitted(over) == {"a": 2, "b": 1, "c": 2}  # 30 saved, the least of the steps that fit
    assert ceiling.fitted({"a": 1, "b": 0, "c": 0}) == {"a": 1, "b": 0, "c": 0}  # already under: unchanged
    tight = SizeCeiling(levels, unit_bytes, 1_000, 1_050)
    fitted = tight.fitted(over)
    assert tight.fits(fitted)
    assert fitted["a"] < 2  # no single step saved enough, so the largest went first


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"budget": {"sparsity": 0.5}, "sparsity": [0.4, 0.5, 0.6], "bits": [4, 16]}, "single bits level"),
        ({"budget": {"bits": 3.0}, "bits": [2, 3, 4, 8]}, "evenly spaced"),
        ({"budget": {"sparsity": 0.9}, "sparsity": [0.4, 0.5, 0.6]}, "outside"),
        ({"budget": {"sparsity": 0.5, "bits": 3}, "sparsity": [0.4, 0.5, 0.6]}, "exactly one"),
        ({"budget": {"sparsity": 0.5}, "sparsity": [0.4, 0.5, 0.6], "sampler": "tpe"}, "evolution sampler"),
        ({"sampler": "evolution"}, "needs a budget"),
        ({"stages": [0.5, 0.25, 1.0]}, "stages"),
        ({"stages": [0.25, 0.5]}, "stages"),
    ],
)
def test_bad_budget_configs_are_refused(search: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SearchConfig.model_validate(search)


def test_a_budget_defaults_to_the_evolution_sampler_staged_fitness_and_baselines() -> None:
    search = SearchConfig.model_validate({"budget": {"sparsity": 0.5}, "sparsity": [0.4, 0.5, 0.6]})
    assert search.sampler == "evolution"
    assert search.stage_fractions() == [0.25, 0.5, 1.0]
    assert search.baseline_names() == ["uniform", "owl", "sensitivity"]
    free = SearchConfig()
    assert free.stage_fractions() == [1.0] and free.baseline_names() == []


@pytest.fixture
def budget_config(tmp_path: Path, tiny_model_dir: Path):
    def make(granularity: str = "linear", **search: object) -> Config:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(random_text(8000, seed=1))
        config = {
            "model": {"name": str(tiny_model_dir), "device": "cpu"},
            "data": {"source": "files", "files": [str(corpus)], "seq_len": 32, "calibration": 4, "fitness": 8},
            "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 32, "granularity": granularity},
            "search": {"sparsity": [0.1, 0.2, 0.3, 0.4, 0.5], "budget": {"sparsity": 0.3}, "seed": 0} | search,
        }
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(config))
        return Config.model_validate(config)

    return make


def test_owl_on_the_model_keeps_the_average_sparsity_at_the_budget(tmp_path: Path, budget_config) -> None:
    from autocompress.allocation import allocation_plan_params, baseline_allocations

    config = budget_config(granularity="block", sparsity=[0.2, 0.3, 0.4, 0.5, 0.6], budget={"sparsity": 0.4})
    session = CompressionSession(config, cache_dir=tmp_path / "cache")
    space = SearchSpace(config, ["model.layers.0", "model.layers.1"])
    allocations = baseline_allocations(session, space, "sparsity", 0.4, ["owl", "uniform"])
    for allocation in allocations.values():
        plan = space.plan_from_params(allocation_plan_params(space, "sparsity", allocation))
        assert average_level(plan, session.linears, "sparsity") == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize(
    ("dimension", "search"),
    [
        ("sparsity", {}),
        ("bits", {"sparsity": [0.0], "bits": [2, 3, 4, 5], "budget": {"bits": 3.5}}),
    ],
)
def test_every_trial_of_a_budget_search_keeps_the_budget(tmp_path: Path, budget_config, dimension, search) -> None:
    config = budget_config(**search)
    target = config.search.budget.average
    location = StudyLocation.resolve("budget", tmp_path / "results")
    study = run_search(config, location, n_trials=16, progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) >= 16
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, [linear.name for linear in session.linears])
    plans = {}
    for trial in trials:
        plan = space.plan_from_params(trial.params)
        assert average_level(plan, session.linears, dimension) == pytest.approx(target, abs=1e-9), trial.number
        plans[trial.number] = plan
    assert len({plan.to_json() for plan in plans.values()}) == len(plans), "no plan is tried twice"
    baselines = [name for trial in trials for name in TrialRecord.of(trial).baselines]
    assert sorted(baselines) == ["owl", "sensitivity", "uniform"]  # one trial each, or shared if they coincide
    record = StudyRecord.of(study)
    assert len(record.baselines) == 3
    sizes = record.unit_sizes  # the sampler's groups: units of one size (q with o, k with v...)
    assert sizes["model.layers.0.self_attn.q_proj"] == sizes["model.layers.1.self_attn.o_proj"] == 64 * 64
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = min(complete, key=lambda trial: TrialRecord.of(trial).loss)
    uniform = next(trial for trial in complete if TrialRecord.of(trial).baseline == "uniform")
    assert TrialRecord.of(best).loss <= TrialRecord.of(uniform).loss
    sizes = {TrialRecord.of(trial).size_bytes for trial in complete}
    # One budget, one size, up to the rounding of each row's pruned count (64 inputs here: 0.2 and 0.4 prune
    # 13 + 26 of a row where 0.3 and 0.3 prune 19 + 19).
    assert max(sizes) - min(sizes) <= 0.01 * max(sizes)

    again = run_search(config, location, n_trials=20, progress=False)  # resumes from the study alone
    finished = again.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) >= 20
    assert all(
        average_level(space.plan_from_params(trial.params), session.linears, dimension) == pytest.approx(target)
        for trial in finished
    )


def test_a_budget_that_the_units_cannot_meet_is_a_user_error(tmp_path: Path, budget_config) -> None:
    config = budget_config(granularity="block", budget={"sparsity": 0.125}, sparsity=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(UserError, match="cannot be met exactly"):
        run_search(config, StudyLocation.resolve("odd", tmp_path / "results"), n_trials=2, progress=False)


def test_the_budget_search_space_recipe_is_valid() -> None:
    from autocompress.config import load_config

    config = load_config(Path(__file__).parent.parent / "search_spaces" / "smollm2-budget.yaml")
    assert config.search.budget.dimension == "sparsity" and config.search.sampler == "evolution"
    assert config.search.stage_fractions() == [0.25, 0.5, 1.0] and config.search.margin() == 0.0


def test_the_additive_knapsack_finds_the_least_error_allocation_that_fits() -> None:
    """Dynamic programming over bytes gives what trying every allocation gives, exactly at the byte; with more room
    than its cells it rounds bytes up and still fits."""
    import random

    from autocompress.additive import MAX_CELLS, knapsack

    rng = random.Random(0)
    for _ in range(20):
        units = [f"u{index}" for index in range(4)]
        unit_bytes = {unit: [0, *sorted(rng.sample(range(1, 60), 2))] for unit in units}
        errors = {unit: sorted((rng.random() for _ in range(3)), reverse=True) for unit in units}
        room = rng.randrange(0, 150)
        feasible = [
            dict(zip(units, choice, strict=True))
            for choice in itertools.product(range(3), repeat=4)
            if sum(unit_bytes[unit][index] for unit, index in zip(units, choice, strict=True)) <= room
        ]
        best = min(sum(errors[unit][index] for unit, index in choice.items()) for choice in feasible)
        chosen = knapsack(errors, unit_bytes, room)
        assert sum(unit_bytes[unit][index] for unit, index in chosen.items()) <= room
        assert sum(errors[unit][index] for unit, index in chosen.items()) == pytest.approx(best)
    large = {unit: [0, 3 * MAX_CELLS, 7 * MAX_CELLS] for unit in ("a", "b")}  # cells of 10 bytes
    chosen = knapsack({"a": [2.0, 1.0, 0.0], "b": [2.0, 1.0, 0.0]}, large, 10 * MAX_CELLS)
    assert sum(large[unit][index] for unit, index in chosen.items()) <= 10 * MAX_CELLS
    assert sorted(chosen.values()) == [1, 2]
    with pytest.raises(ValueError, match="no allocation fits"):
        knapsack({"a": [0.0]}, {"a": [0]}, -1)


def test_the_additive_baseline_belongs_to_size_budgets() -> None:
    with pytest.raises(ValidationError, match="the additive baseline allocates bytes under a size budget"):
        SearchConfig.model_validate({"baselines": ["additive"]})
    with pytest.raises(ValidationError, match="additive baseline allocates bytes"):
        SearchConfig.model_validate({"budget": {"bits": 4.0}, "bits": [2, 4, 8], "baselines": ["additive"]})
