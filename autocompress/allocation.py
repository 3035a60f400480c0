"""Allocations at a budget: which level each unit gets so that the average sparsity (or bit-width) is fixed.

A budget is an average over the compressible weights, weighted by their number. Units with the same number
of weights form a group (all decoder blocks; per Linear, e.g. all q_proj and o_proj of a model, or all its
MLP projections), and every allocation here keeps the sum of level indices of each group fixed: with evenly
spaced levels and same-sized units that is exactly the budget, and it is what lets a search move compression
from one unit to another without changing the size (`search/evolution.py`), as EvoPress's groups by size.
Without the sizes, units whose names differ only in the block index are grouped (same shape in a transformer).

- uniform: every unit at the budget; between two levels, the two alternate within each group.
- OWL (Yin et al. 2023, outlier-weighted layerwise sparsity): a unit's outlier ratio is the fraction of its
  Wanda scores |W_ij|·‖X_j‖ above `threshold` × their mean; ratios are scaled to [0, 2·spread] and centred,
  and a unit gets budget − that shift in sparsity (more outliers, less pruning), or budget + shift in bits
  (an OWL-style bit allocation: more outliers, more bits). Then rounded to the levels keeping the budget.
- sensitivity: from a per-unit error profile (the loss increase when only that unit is compressed, at each
  level, measured once and cached), the allocation minimizing the summed increases at the budget (an exact
  dynamic programme per group).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from autocompress.methods import LayerStatistics
from autocompress.models import CompressibleLinear
from autocompress.plan import CompressionPlan, parse_level
from autocompress.sensitivity import cached_profile, measure_sensitivity, variant_label

if TYPE_CHECKING:
    from autocompress.search.space import SearchSpace
    from autocompress.session import CompressionSession

Allocation = dict[str, float]  # unit -> level
_INDEX = re.compile(r"\.\d+(?=\.|$)")
DEFAULT_SPREAD = {"sparsity": 0.08, "bits": 0.8}  # OWL's lambda; for bits, in bits
IDENTITY = {"sparsity": 0.0, "bits": 16}


def unit_groups(units: Sequence[str], sizes: Mapping[str, int] | None = None) -> list[list[str]]:
    """Units of one size (weights), or without `sizes` units that differ only in their block index; in model
    order."""
    groups: dict[object, list[str]] = {}
    for unit in units:
        key = sizes[unit] if sizes is not None else _INDEX.sub(".*", unit)
        groups.setdefault(key, []).append(unit)
    return list(groups.values())


def unit_sizes(linears: Sequence[CompressibleLinear], granularity: str) -> dict[str, int]:
    """The number of compressible weights of each unit."""
    sizes: dict[str, int] = {}
    for linear in linears:
        unit = unit_of(linear, granularity)
        sizes[unit] = sizes.get(unit, 0) + linear.module.weight.numel()
    return sizes


class BudgetGrid:
    """Evenly spaced levels, the units' groups, and the level-index sum each group must keep."""

    def __init__(
        self, units: Sequence[str], levels: Sequence[float], average: float, sizes: Mapping[str, int] | None = None
    ) -> None:
        self.units = list(units)
        self.levels = sorted(levels)
        if len(self.levels) < 2:
            raise ValueError(f"a budget needs two or more levels, got {self.levels}")
        self.step = self.levels[1] - self.levels[0]
        if any(abs(b - a - self.step) > 1e-9 for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"a budget needs evenly spaced levels, got {self.levels}")
        if not self.levels[0] - 1e-9 <= average <= self.levels[-1] + 1e-9:
            raise ValueError(f"the budget {average} lies outside the levels {self.levels}")
        self.average = average
        self.groups = unit_groups(self.units, sizes)
        self.sums = {}
        for group in self.groups:
            exact = len(group) * (average - self.levels[0]) / self.step
            if abs(exact - round(exact)) > 1e-6:
                raise ValueError(
                    f"a budget of {average:g} cannot be met exactly by {len(group)} units of levels {self.levels} "
                    f"(e.g. {group[0]}); choose a budget on a level or halfway between two"
                )
            self.sums[group[0]] = round(exact)

    @property
    def top(self) -> int:
        return len(self.levels) - 1

    def index(self, level: float) -> int:
        position = (level - self.levels[0]) / self.step
        if abs(position - round(position)) > 1e-6 or not 0 <= round(position) <= self.top:
            raise ValueError(f"{level} is not one of the levels {self.levels}")
        return round(position)

    def level(self, index: int) -> float:
        return self.levels[index]

    def respects(self, allocation: Mapping[str, float]) -> bool:
        return all(sum(self.index(allocation[unit]) for unit in group) == self.sums[group[0]] for group in self.groups)

    def round(self, continuous: Mapping[str, float]) -> Allocation:
        """The nearest allocation on the levels that keeps each group's sum: floor, then hand the remaining
        steps to the largest fractional parts (largest-remainder rounding), within the levels."""
        allocation: Allocation = {}
        for group in self.groups:
            wanted = [min(max((continuous[unit] - self.levels[0]) / self.step, 0.0), self.top) for unit in group]
            chosen = [math.floor(value + 1e-9) for value in wanted]
            total = self.sums[group[0]]
            while sum(chosen) < total:
                candidates = [i for i in range(len(group)) if chosen[i] < self.top]
                best = max(candidates, key=lambda i: (wanted[i] - chosen[i], -i))
                chosen[best] += 1
            while sum(chosen) > total:
                candidates = [i for i in range(len(group)) if chosen[i] > 0]
                best = min(candidates, key=lambda i: (wanted[i] - chosen[i], i))
                chosen[best] -= 1
            allocation |= {unit: self.level(index) for unit, index in zip(group, chosen, strict=True)}
        return allocation


def uniform_allocation(grid: BudgetGrid) -> Allocation:
    """Every unit at the budget; between two levels, the upper one spread evenly over each group."""
    allocation: Allocation = {}
    for group in grid.groups:
        low = grid.sums[group[0]] // len(group)
        extra = grid.sums[group[0]] - low * len(group)  # units that take the level above
        for position, unit in enumerate(group):
            upper = (position + 1) * extra // len(group) - position * extra // len(group)
            allocation[unit] = grid.level(low + upper)
    return allocation


def below_the_smallest_plan(ceiling: int, smallest: int) -> str:
    """Why a size budget is refused: no plan fits under its `ceiling`, the smallest taking `smallest` bytes."""
    return f"the size budget of {ceiling:,} bytes is below the smallest plan's {smallest:,} bytes"


class SizeCeiling:
    """Levels per unit (fewest bits first) under a ceiling on the model's bytes, for a size budget.

    A plan's bytes are the fixed bytes (the plan with every unit at its first level) plus what each unit's level
    adds to its first level's bytes, which `size_ceiling` measures once with the study's own size accounting
    (bytes add up unit by unit in every target). An allocation maps each unit to the index of its level.
    """

    def __init__(
        self, unit_levels: Mapping[str, Sequence], unit_bytes: Mapping[str, Sequence[int]], fixed: int, ceiling: int
    ) -> None:
        self.units = list(unit_levels)
        self.levels = {unit: list(levels) for unit, levels in unit_levels.items()}
        self.unit_bytes = {unit: list(sizes) for unit, sizes in unit_bytes.items()}
        self.fixed = fixed
        self.ceiling = ceiling
        smallest = self.total(dict.fromkeys(self.units, 0))
        if smallest > ceiling:
            raise ValueError(below_the_smallest_plan(ceiling, smallest))

    def total(self, allocation: Mapping[str, int]) -> int:
        return self.fixed + sum(self.unit_bytes[unit][index] for unit, index in allocation.items())

    def fits(self, allocation: Mapping[str, int]) -> bool:
        return self.total(allocation) <= self.ceiling

    def initial(self) -> dict[str, int]:
        """Every unit at the widest level that lets every unit take it (or its widest below), then units raised
        one level at a time in model order while the plan fits: the uniform allocation at the ceiling."""
        allocation = dict.fromkeys(self.units, 0)
        for level in sorted({level for levels in self.levels.values() for level in levels}, key=self._bits):
            wider = {
                unit: max(index for index, own in enumerate(self.levels[unit]) if self._bits(own) <= self._bits(level))
                for unit in self.units
                if self._bits(self.levels[unit][0]) <= self._bits(level)
            }
            if self.fits(allocation | wider):
                allocation |= wider
        return self._raised_while_it_fits(allocation, self.units)

    def _raised_while_it_fits(self, allocation: dict[str, int], units: Sequence[str]) -> dict[str, int]:
        """`allocation` with `units` raised one level at a time, in order, round after round, while it fits."""
        raised = True
        while raised:
            raised = False
            for unit in units:
                if allocation[unit] + 1 < len(self.levels[unit]):
                    allocation[unit] += 1
                    if self.fits(allocation):
                        raised = True
                    else:
                        allocation[unit] -= 1
        return allocation

    def fitted(self, allocation: Mapping[str, int]) -> dict[str, int]:
        """`allocation` moved under the ceiling by the smallest change: while it is over, the one-level step down
        that saves the fewest bytes among those that bring it under, or, when no single step does, the one that
        saves the most. An allocation that fits is returned as it is."""
        fitted = dict(allocation)
        while not self.fits(fitted):
            steps = {
                unit: self.unit_bytes[unit][index] - self.unit_bytes[unit][index - 1]
                for unit, index in fitted.items()
                if index > 0
            }
            excess = self.total(fitted) - self.ceiling
            enough = [unit for unit, saved in steps.items() if saved >= excess]
            unit = min(enough, key=steps.get) if enough else max(steps, key=steps.get)
            fitted[unit] -= 1
        return fitted

    def mutate(self, parent: Mapping[str, int], rng, max_mutations: int, attempts: int = 200) -> dict[str, int]:
        """`parent` with min(U, U') switches (U, U' uniform in 1..`max_mutations`), each one unit a level up and
        another a level down, kept only when the plan still fits under the ceiling."""
        child = dict(parent)
        count = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))
        made = 0
        for _ in range(attempts):
            if made == count:
                break
            up, down = rng.sample(self.units, 2)
            if child[up] + 1 >= len(self.levels[up]) or child[down] == 0:
                continue
            child[up] += 1
            child[down] -= 1
            if self.fits(child):
                made += 1
            else:
                child[up] -= 1
                child[down] += 1
        return child

    @staticmethod
    def _bits(level) -> float:
        return parse_level(level).bits if isinstance(level, str) else level

    def param(self, unit: str, key: str) -> str:
        """The trial parameter holding `unit`'s level (`key`: the space's precision key)."""
        return f"{unit}.{key}"

    def params_of(self, allocation: Mapping[str, int], key: str) -> dict[str, Any]:
        """The trial parameters of an allocation (each unit's level index)."""
        return {self.param(unit, key): self.levels[unit][index] for unit, index in allocation.items()}


def smallest_first(key: str, values: Sequence) -> list:
    """A structural parameter's values, the one that stores fewest bytes first (a removed block, the narrowest FFN,
    the fewest key/value groups) and the teacher's last."""
    return [True, False] if key.endswith(".removed") else sorted(values)


class StructuredCeiling(SizeCeiling):
    """A size budget over the units' levels and the blocks' shapes (`search.structure`) together: each structural
    parameter (`{block}.ffn`, `.kv_groups`, `.removed`) is a unit of its own whose levels run from the smallest shape
    to the teacher's. A block's bytes depend on its shape and its units' types at once, so a total is the plan's
    exact size (`total_of`, memoized) rather than a sum of per-unit bytes (the additive seed linearizes it:
    `additive.structured_bytes`)."""

    def __init__(
        self,
        unit_levels: Mapping[str, Sequence],
        structure_choices: Mapping[str, Sequence],
        total_of: Callable[[Mapping[str, Any]], int],
        ceiling: int,
    ) -> None:
        self.units = [*unit_levels, *structure_choices]
        self.levels = {unit: list(levels) for unit, levels in unit_levels.items()}
        self.levels |= {key: smallest_first(key, values) for key, values in structure_choices.items()}
        self.shapes = list(structure_choices)
        self.ceiling = ceiling
        self._total_of = total_of
        self._totals: dict[tuple[int, ...], int] = {}
        smallest = self.total(dict.fromkeys(self.units, 0))
        if smallest > ceiling:
            raise ValueError(below_the_smallest_plan(ceiling, smallest))

    def param(self, unit: str, key: str) -> str:
        return unit if unit in self.shapes else f"{unit}.{key}"

    def total(self, allocation: Mapping[str, int]) -> int:
        key = tuple(allocation[unit] for unit in self.units)
        if key not in self._totals:
            self._totals[key] = self._total_of({unit: self.levels[unit][allocation[unit]] for unit in self.units})
        return self._totals[key]

    def _step_down(self, allocation: dict[str, int], units: Sequence[str]) -> bool:
        """Move `allocation` one level down in the unit of `units` whose step saves the most bytes, preferring a step
        that brings it under the ceiling with the fewest bytes saved (as `SizeCeiling.fitted` does); False when none
        can go lower."""
        current = self.total(allocation)
        savings = {}
        for unit in units:
            if allocation[unit] > 0:
                savings[unit] = current - self.total(allocation | {unit: allocation[unit] - 1})
        if not savings:
            return False
        excess = current - self.ceiling
        enough = [unit for unit, saved in savings.items() if saved >= excess]
        unit = min(enough, key=savings.get) if enough else max(savings, key=savings.get)
        allocation[unit] -= 1
        return True

    def initial(self) -> dict[str, int]:
        """The teacher's shapes with every unit at its first level, shapes then stepped down (most bytes saved first)
        until the plan fits, then units raised one level at a time in model order while it still fits."""
        shapes = {key: len(self.levels[key]) - 1 for key in self.shapes}
        allocation = dict.fromkeys(self.units, 0) | shapes
        while not self.fits(allocation) and self._step_down(allocation, self.shapes):
            pass
        return self._raised_while_it_fits(allocation, [unit for unit in self.units if unit not in self.shapes])

    def fitted(self, allocation: Mapping[str, int]) -> dict[str, int]:
        fitted = dict(allocation)
        while not self.fits(fitted) and self._step_down(fitted, self.units):
            pass
        return fitted

    def fitted_and_filled(self, allocation: Mapping[str, int]) -> dict[str, int]:
        """`allocation` moved under the ceiling (`fitted`), then its units (not its shapes) raised one level at a time
        in model order while it still fits: a plan whose size was estimated, made exact."""
        units = [unit for unit in self.units if unit not in self.shapes]
        return self._raised_while_it_fits(self.fitted(allocation), units)


def size_ceiling(session: CompressionSession, space: SearchSpace, ceiling: int) -> SizeCeiling:
    """The size budget's levels and bytes per unit, from the session's own size accounting (the study's target):
    each unit's bytes at each level are the plan's bytes with that unit there and every other unit at its first
    level, less the bytes of that all-first plan. With block shapes in the space, a `StructuredCeiling`."""
    key = space.precision_key
    if space.structure_choices:
        unit_levels = {unit: space.levels_of(unit) for unit in space.units}

        def total_of(levels: Mapping[str, Any]) -> int:
            shapes = space.structure_choices
            params = {(unit if unit in shapes else f"{unit}.{key}"): level for unit, level in levels.items()}
            return session.size(space.plan_from_params(params)).total_bytes

        return StructuredCeiling(unit_levels, space.structure_choices, total_of, ceiling)
    base = {f"{unit}.{key}": space.levels_of(unit)[0] for unit in space.units}

    def total(params: dict) -> int:
        return session.size(space.plan_from_params(params)).total_bytes

    fixed = total(base)
    unit_bytes = {}
    for unit in space.units:
        unit_bytes[unit] = [total(base | {f"{unit}.{key}": level}) - fixed for level in space.levels_of(unit)]
    return SizeCeiling({unit: space.levels_of(unit) for unit in space.units}, unit_bytes, fixed, ceiling)


def average_level(plan: CompressionPlan, linears: Sequence[CompressibleLinear], dimension: str) -> float:
    """The plan's sparsity or bit-width averaged over the compressible weights (weighted by their number)."""
    total = weighted = 0.0
    for linear in linears:
        count = linear.module.weight.numel()
        weighted += count * getattr(plan.setting(linear.name, linear.block), dimension)
        total += count
    return weighted / total


def unit_of(linear: CompressibleLinear, granularity: str) -> str:
    return linear.name if granularity == "linear" else linear.block


@torch.no_grad()
def outlier_ratios(
    linears: Sequence[CompressibleLinear],
    dense_weights: Mapping[str, torch.Tensor],
    statistics: Mapping[str, LayerStatistics],
    granularity: str,
    threshold: float = 5.0,
) -> dict[str, float]:
    """OWL's layerwise outlier distribution: per unit, the fraction of Wanda scores |W|·‖X‖ above
    `threshold` × their mean, over all the unit's Linears together."""
    scores: dict[str, list[torch.Tensor]] = {}
    for linear in linears:
        norms = statistics[linear.name].input_sq_norms
        if norms is None:
            raise ValueError("OWL needs the calibration activation norms (input_sq_norms)")
        weight = dense_weights[linear.name].float()
        score = weight.abs() * norms.to(weight).sqrt().unsqueeze(0)
        scores.setdefault(unit_of(linear, granularity), []).append(score.flatten())
    ratios = {}
    for unit, parts in scores.items():
        joined = torch.cat(parts)
        ratios[unit] = (joined > threshold * joined.mean()).float().mean().item()
    return ratios


def owl_allocation(
    ratios: Mapping[str, float], grid: BudgetGrid, dimension: str, spread: float | None = None
) -> Allocation:
    """OWL: shifts of at most ±`spread` from the budget, fewer pruned weights (more bits) where more outliers."""
    spread = DEFAULT_SPREAD[dimension] if spread is None else spread
    values = torch.tensor([ratios[unit] for unit in grid.units], dtype=torch.float64)
    width = values.max() - values.min()
    scaled = (values - values.min()) / width * 2 * spread if width > 0 else torch.zeros_like(values)
    shift = scaled - scaled.mean()
    sign = -1.0 if dimension == "sparsity" else 1.0
    continuous = {unit: grid.average + sign * float(delta) for unit, delta in zip(grid.units, shift, strict=True)}
    return grid.round(continuous)


def sensitivity_allocation(profile: Mapping[str, Mapping[float, float]], grid: BudgetGrid) -> Allocation:
    """The allocation minimizing the sum of per-unit loss increases at the budget (exact, per group)."""
    allocation: Allocation = {}
    for group in grid.groups:
        total = grid.sums[group[0]]
        infinity = float("inf")
        best = [0.0] + [infinity] * total  # best[s]: least cost of the units so far with index sum s
        choices: list[list[int]] = []
        for unit in group:
            costs = [profile[unit][grid.level(index)] for index in range(grid.top + 1)]
            following = [infinity] * (total + 1)
            picked = [-1] * (total + 1)
            for reached, cost_so_far in enumerate(best):
                if cost_so_far == infinity:
                    continue
                for index, cost in enumerate(costs):
                    if reached + index <= total and cost_so_far + cost < following[reached + index]:
                        following[reached + index] = cost_so_far + cost
                        picked[reached + index] = index
            choices.append(picked)
            best = following
        remaining = total
        for unit, picked in zip(reversed(group), reversed(choices), strict=True):
            index = picked[remaining]
            allocation[unit] = grid.level(index)
            remaining -= index
    return allocation


def allocation_plan_params(
    space: SearchSpace, dimension: str, allocation: Mapping[str, float], other: float | None = None
) -> dict[str, float | int]:
    """Trial parameters of an allocation: the budget dimension per unit, the other one at `other`
    (its single level, or the given one when it also varies)."""
    params: dict[str, float | int] = {}
    other_dimension = "bits" if dimension == "sparsity" else "sparsity"
    varying = {"sparsity": len(space.sparsity_levels) > 1, "bits": len(space.bit_levels) > 1}
    for unit in space.units:
        if varying[dimension]:
            params[f"{unit}.{dimension}"] = _as_level(dimension, allocation[unit])
        if varying[other_dimension]:
            params[f"{unit}.{other_dimension}"] = _as_level(other_dimension, other)
    return params


def _as_level(dimension: str, value: float | None) -> float | int:
    if value is None:
        raise ValueError(f"the {dimension} of the other dimension must be given when it varies")
    return int(value) if dimension == "bits" else float(value)


def measure_profile(
    session: CompressionSession,
    space: SearchSpace,
    dimension: str,
    levels: Sequence[float],
    windows: int,
    other: float | None = None,
    progress: bool = False,
) -> dict[str, dict[float, float]]:
    """Per unit and level: the fitness-loss increase over the base plan when only that unit takes the level.

    The base plan leaves the budget dimension uncompressed (sparsity 0 or 16 bits) and the other dimension at
    `other` (or its single level). Measured on the first `windows` fitness windows, once: kept in the
    session's cache folder and extended unit by unit, so an interrupted profile resumes.
    """
    other_dimension = "bits" if dimension == "sparsity" else "sparsity"
    if other is None:
        other = space.bit_levels[0] if other_dimension == "bits" else space.sparsity_levels[0]
    key_fields = {
        "dimension": dimension,
        "levels": [float(level) for level in levels],
        "other": float(other),
        "windows": windows,
        "loss": session.config.search.loss,
        "compression": session.config.compression.model_dump(mode="json"),
        "units": list(space.units),
    }
    stored, save = cached_profile(session.cache_dir, dimension, key_fields)

    identity = IDENTITY[dimension]
    compressed = {variant_label({dimension: _as_level(dimension, level)}): float(level) for level in levels}
    compressed = {label: level for label, level in compressed.items() if level != identity}
    base = allocation_plan_params(space, dimension, dict.fromkeys(space.units, identity), other)
    variants = [{dimension: _as_level(dimension, level)} for level in compressed.values()]
    measure_sensitivity(session, space, base, variants, windows, stored, save, progress, f"{dimension} error profile")
    return {
        unit: {compressed[label]: value for label, value in row.items()} | {float(identity): 0.0}
        for unit, row in stored["values"].items()
    }


def baseline_allocations(
    session: CompressionSession,
    space: SearchSpace,
    dimension: str,
    average: float,
    names: Sequence[str],
    levels: Sequence[float] | None = None,
    other: float | None = None,
    progress: bool = False,
    on_missing: Callable[[str, str], None] | None = None,
) -> dict[str, Allocation]:
    """The named allocations (uniform, owl, sensitivity) of `dimension` at `average`, on the space's levels."""
    search = session.config.search
    levels = list(
        levels if levels is not None else (space.sparsity_levels if dimension == "sparsity" else space.bit_levels)
    )
    grid = BudgetGrid(space.units, levels, average, unit_sizes(session.linears, space.config.compression.granularity))
    allocations: dict[str, Allocation] = {}
    for name in names:
        if name == "uniform":
            allocations[name] = uniform_allocation(grid)
        elif name == "owl":
            statistics = session.statistics({"input_sq_norms"})
            ratios = outlier_ratios(
                session.linears, session.dense_weights, statistics, space.config.compression.granularity,
                search.owl_threshold,
            )  # fmt: skip
            allocations[name] = owl_allocation(ratios, grid, dimension, search.owl_spread)
        elif name == "sensitivity":
            windows = search.profile_windows or max(1, len(session.pools.fitness) // 4)
            profile = measure_profile(session, space, dimension, levels, windows, other, progress)
            allocations[name] = sensitivity_allocation(profile, grid)
        elif on_missing is not None:
            on_missing(name, "unknown allocation")
    return allocations
