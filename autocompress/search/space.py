"""The search space: which levels each unit may take, the trial → plan mapping, and the uniform seeds."""

from __future__ import annotations

import json
from itertools import product

import optuna

from autocompress.config import Config
from autocompress.plan import UNQUANTIZED, CompressionPlan

Params = dict[str, float | int | str]


class SearchSpace:
    """Per-unit choices of sparsity and precision over the units of one model.

    The precision is a bit-width (`{unit}.bits`, from `search.bits`) or a named level (`{unit}.format`, from
    `search.formats`: int4-g128, nf4, mxfp4, nvfp4, fp8-e4m3...), whichever the config lists.
    """

    def __init__(self, config: Config, units: list[str]) -> None:
        self.config = config
        self.units = units
        self.sparsity_levels = config.search.sparsity_levels()
        self.bit_levels = config.search.bit_levels()
        self.precision_levels = config.search.precision_levels()  # fewest bits first
        self.precision_key = "bits" if config.search.formats is None else "format"

    def plan_for(self, trial: optuna.Trial) -> CompressionPlan:
        """Ask the trial for every unit's sparsity and precision; the only place that reads trials."""
        params: Params = {}
        for unit in self.units:
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = trial.suggest_categorical(f"{unit}.sparsity", self.sparsity_levels)
            if len(self.precision_levels) > 1:
                key = f"{unit}.{self.precision_key}"
                params[key] = trial.suggest_categorical(key, self.precision_levels)
        return self.plan_from_params(params)

    def plan_from_params(self, params: Params) -> CompressionPlan:
        """The plan a trial's parameters describe; levels the space fixes come from its single choice."""
        complete = {}
        for unit in self.units:
            precision = f"{unit}.{self.precision_key}"
            complete[f"{unit}.sparsity"] = params.get(f"{unit}.sparsity", self.sparsity_levels[0])
            complete[precision] = params.get(precision, self.precision_levels[0])
        return CompressionPlan.from_params(complete, **self.config.compression.plan_options())

    def uniform_params(self, sparsity: float, precision: int | str) -> Params:
        params: Params = {}
        for unit in self.units:
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = sparsity
            if len(self.precision_levels) > 1:
                params[f"{unit}.{self.precision_key}"] = precision
        return params

    def dense_params(self) -> Params:
        """The parameters of the dense model: no pruning, every weight in 16 bits (whatever the space fixes)."""
        dense = 16 if self.precision_key == "bits" else UNQUANTIZED
        params: Params = {}
        for unit in self.units:
            params |= {f"{unit}.sparsity": 0.0, f"{unit}.{self.precision_key}": dense}
        return params

    def seeds(self) -> list[Params]:
        """Uniform plans enqueued before any sampled one, so the frontier is never worse than uniform.

        'levels': each sparsity level alone (weights kept at the widest precision offered), and each precision
        level (bit-width or format) alone (no pruning, or the lightest sparsity offered). 'grid': every
        combination. A budget search has none here: its seeds are the baseline allocations at the budget
        (`search.study.enqueue_baselines`), as plans off the budget would be.
        """
        mode = self.config.search.seeds
        if mode == "none" or self.config.search.budget is not None:  # a budget search seeds its baselines
            return []
        if mode == "grid":
            pairs = list(product(self.sparsity_levels, self.precision_levels))
        else:
            widest, lightest = self.precision_levels[-1], self.sparsity_levels[0]
            pairs = [(level, widest) for level in self.sparsity_levels]
            pairs += [(lightest, precision) for precision in self.precision_levels]
        unique = list(dict.fromkeys(pairs))
        return [self.uniform_params(sparsity, precision) for sparsity, precision in unique]

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
        if search.formats is not None:  # likewise
            space["formats"] = self.precision_levels
        return json.dumps(space, sort_keys=True)
