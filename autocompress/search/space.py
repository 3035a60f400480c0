"""The search space: which levels each unit may take, the trial → plan mapping, and the uniform seeds."""

from __future__ import annotations

import json
from itertools import product

import optuna

from autocompress.config import Config
from autocompress.plan import CompressionPlan


class SearchSpace:
    """Per-unit choices of sparsity and bit-width over the units of one model."""

    def __init__(self, config: Config, units: list[str]) -> None:
        self.config = config
        self.units = units
        self.sparsity_levels = config.search.sparsity_levels()
        self.bit_levels = config.search.bit_levels()

    def plan_for(self, trial: optuna.Trial) -> CompressionPlan:
        """Ask the trial for every unit's sparsity and bit-width; the only place that reads trials."""
        params: dict[str, float | int] = {}
        for unit in self.units:
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = trial.suggest_categorical(f"{unit}.sparsity", self.sparsity_levels)
            if len(self.bit_levels) > 1:
                params[f"{unit}.bits"] = trial.suggest_categorical(f"{unit}.bits", self.bit_levels)
        return self.plan_from_params(params)

    def plan_from_params(self, params: dict[str, float | int]) -> CompressionPlan:
        """The plan a trial's parameters describe; levels the space fixes come from its single choice."""
        complete = {}
        for unit in self.units:
            complete[f"{unit}.sparsity"] = params.get(f"{unit}.sparsity", self.sparsity_levels[0])
            complete[f"{unit}.bits"] = params.get(f"{unit}.bits", self.bit_levels[0])
        return CompressionPlan.from_params(complete, **self.config.compression.plan_options())

    def uniform_params(self, sparsity: float, bits: int) -> dict[str, float | int]:
        params: dict[str, float | int] = {}
        for unit in self.units:
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = sparsity
            if len(self.bit_levels) > 1:
                params[f"{unit}.bits"] = bits
        return params

    def seeds(self) -> list[dict[str, float | int]]:
        """Uniform plans enqueued before any sampled one, so the frontier is never worse than uniform.

        'levels': each sparsity level alone (weights kept at full precision, or the widest bit-width offered),
        and each bit-width alone (no pruning, or the lightest sparsity offered). 'grid': every combination.
        A budget search has none here: its seeds are the baseline allocations at the budget
        (`search.study.enqueue_baselines`), as plans off the budget would be.
        """
        mode = self.config.search.seeds
        if mode == "none" or self.config.search.budget is not None:  # a budget search seeds its baselines
            return []
        if mode == "grid":
            pairs = list(product(self.sparsity_levels, self.bit_levels))
        else:
            widest, lightest = self.bit_levels[-1], self.sparsity_levels[0]
            pairs = [(level, widest) for level in self.sparsity_levels]
            pairs += [(lightest, bits) for bits in self.bit_levels]
        unique = list(dict.fromkeys(pairs))
        return [self.uniform_params(sparsity, bits) for sparsity, bits in unique]

    def fingerprint(self) -> str:
        """What makes trials of one study comparable; a resumed study must match it exactly."""
        search = self.config.search
        scored = {"objective": search.objective, "loss": search.loss}
        if search.objective == "scalar":
            scored |= {"alpha": search.alpha, "beta": search.beta}
        space = {
            "model": self.config.model.model_dump(exclude={"device"}),
            "data": self.config.data.model_dump(exclude={"batch_size"}),
            "compression": self.config.compression.model_dump(),
            "sparsity": self.sparsity_levels,
            "bits": self.bit_levels,
            "units": self.units,
            "scoring": scored,
        }
        if search.budget is not None:  # left out otherwise, so studies made before budgets existed still match
            space["budget"] = search.budget.model_dump(exclude_none=True)
        return json.dumps(space, sort_keys=True)
