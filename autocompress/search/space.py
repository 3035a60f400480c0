"""The search space: which levels each unit may take (and, with a student section, which student
architecture), the trial → plan mapping, and the uniform seeds."""

from __future__ import annotations

import json
from functools import cached_property
from itertools import product

import optuna
from optuna.distributions import CategoricalDistribution

from autocompress.config import Config
from autocompress.models import meta_model
from autocompress.plan import STUDENT_PREFIX, UNQUANTIZED, CompressionPlan, parse_level
from autocompress.record import StudyRecord
from autocompress.structure import structure_choices

Params = dict[str, float | int | str]


def block_index(unit: str) -> int:
    """The decoder block a unit belongs to: the first number in its name (`model.layers.3.mlp.up_proj` → 3)."""
    return next(int(part) for part in unit.split(".") if part.isdigit())


def decoder_block_names(units: list[str]) -> list[str]:
    """The decoder blocks the units lie in, in model order: each unit's name up to its first number
    (`model.layers.3.mlp.up_proj` → `model.layers.3`); units outside the blocks (the embedding) have none."""
    blocks: dict[int, str] = {}
    for unit in units:
        parts = unit.split(".")
        position = next((index for index, part in enumerate(parts) if part.isdigit()), None)
        if position is not None:
            blocks[int(parts[position])] = ".".join(parts[: position + 1])
    return [blocks[index] for index in sorted(blocks)]


def nearest_level(levels: list, precision: int | str) -> int | str:
    """`precision` if `levels` (fewest bits first) hold it, else the first with as many bits or more, else the
    widest."""
    if precision in levels:
        return precision
    bits = parse_level(precision).bits if isinstance(precision, str) else precision
    wider = [level for level in levels if (parse_level(level).bits if isinstance(level, str) else level) >= bits]
    return wider[0] if wider else levels[-1]


class SearchSpace:
    """Per-unit choices of sparsity and precision over the units of one model, and optionally the student
    architecture (`search.student`), whose units are the first `num_layers` blocks' (a student names its
    blocks 0..n-1 as the teacher does).

    The precision is a bit-width (`{unit}.bits`, from `search.bits`) or a named level (`{unit}.format`, from
    `search.formats`: int4-g128, nf4, mxfp4, nvfp4, fp8-e4m3, or under the gguf target q4_k, q6_k...), whichever
    the config lists. `unit_levels` narrows each unit's levels where the target's blocks do not split its rows.

    With `search.structure`, each decoder block also takes a shape (`autocompress.structure.structure_choices`):
    `{block}.ffn`, `{block}.kv_groups` and `{block}.removed`, categorical like the levels, asked before them. Every
    seed keeps the teacher's shape (`teacher_structure_params`), so the seeds are the plans of quantization alone.
    """

    def __init__(self, config: Config, units: list[str], unit_levels: dict[str, list[str]] | None = None) -> None:
        self.config = config
        self.units = units
        self.unit_levels = unit_levels
        self.sparsity_levels = config.search.sparsity_levels()
        self.bit_levels = config.search.bit_levels()
        self.precision_levels = config.search.precision_levels()  # fewest bits first
        self.precision_key = "bits" if config.search.formats is None else "format"
        student = config.search.student
        self.student_choices = {} if student is None else student.dimensions()
        structure = config.search.structure
        self.structure_choices: dict[str, list] = {}
        if structure is not None:
            blocks = decoder_block_names(units)
            blocks_name = blocks[0].rpartition(".")[0] if blocks else "model.layers"
            choices = structure_choices(
                structure.ffn, structure.kv_groups, structure.drop_blocks, len(blocks), blocks_name
            )
            self.structure_choices = {key: values for key, values in choices.items() if len(values) > 1}

    @cached_property
    def teacher_kv_groups(self) -> int:
        """The teacher's key/value heads, read from its config alone (no weights load)."""
        config = meta_model(self.config.model).config
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def teacher_structure_params(self) -> Params:
        """Every structural parameter at the teacher's shape (or the largest offered): what each seed keeps."""
        params: Params = {}
        for key, values in self.structure_choices.items():
            params[key] = False if key.endswith(".removed") else values[-1]
        return params

    def structure_params(self, trial: optuna.Trial) -> Params:
        """The block shapes the trial chooses."""
        return {key: trial.suggest_categorical(key, values) for key, values in self.structure_choices.items()}

    def _teachers_shape(self, key: str, value: float | int | bool) -> bool:
        """Whether a structural parameter's value is the teacher's own, which a plan does not name."""
        field = key.rpartition(".")[2]
        if field == "kv_groups":
            return value == self.teacher_kv_groups
        return value == (1.0 if field == "ffn" else False)

    @classmethod
    def of_record(cls, record: StudyRecord) -> SearchSpace:
        """The space a study was created with."""
        return cls(record.config, record.units, record.unit_levels)

    def levels_of(self, unit: str) -> list:
        """The precision levels `unit` may take, fewest bits first."""
        return self.precision_levels if self.unit_levels is None else self.unit_levels[unit]

    def student_params(self, trial: optuna.Trial) -> dict[str, int]:
        """The architecture the trial chooses: `student.<dimension>` for each dimension with several values."""
        return {
            f"{STUDENT_PREFIX}{dimension}": trial.suggest_categorical(f"{STUDENT_PREFIX}{dimension}", values)
            for dimension, values in self.student_choices.items()
            if len(values) > 1
        }

    def largest_student(self) -> dict[str, int]:
        """The parameters of the largest architecture offered (the teacher itself, when the lists include it)."""
        return {
            f"{STUDENT_PREFIX}{dimension}": values[-1]
            for dimension, values in self.student_choices.items()
            if len(values) > 1
        }

    def units_of(self, params: Params) -> list[str]:
        """The units of the model the parameters describe: the student's first blocks, or all of them."""
        layers = params.get(f"{STUDENT_PREFIX}num_layers")
        if layers is None and "num_layers" in self.student_choices:
            layers = self.student_choices["num_layers"][-1]
        return self.units if layers is None else [unit for unit in self.units if block_index(unit) < layers]

    def plan_for(self, trial: optuna.Trial) -> CompressionPlan:
        """Ask the trial for its architecture, then every unit's sparsity and precision; the only place that
        reads trials."""
        params: Params = dict(self.student_params(trial)) | self.structure_params(trial)
        for unit in self.units_of(params):
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = trial.suggest_categorical(f"{unit}.sparsity", self.sparsity_levels)
            if len(self.levels_of(unit)) > 1:
                key = f"{unit}.{self.precision_key}"
                params[key] = trial.suggest_categorical(key, self.levels_of(unit))
        return self.plan_from_params(params)

    def distribution_of(self, key: str) -> CategoricalDistribution:
        """The distribution `plan_for` suggests a unit's parameter `{unit}.sparsity` or `{unit}.{precision}` from."""
        if key in self.structure_choices:
            return CategoricalDistribution(self.structure_choices[key])
        unit, _, dimension = key.rpartition(".")
        return CategoricalDistribution(self.sparsity_levels if dimension == "sparsity" else self.levels_of(unit))

    def plan_from_params(self, params: Params) -> CompressionPlan:
        """The plan a trial's parameters describe; levels the space fixes come from its single choice (the
        largest architecture where a varying dimension is missing)."""
        complete: Params = {}
        for dimension, values in self.student_choices.items():
            key = f"{STUDENT_PREFIX}{dimension}"
            complete[key] = params.get(key, values[-1])
        for key, default in self.teacher_structure_params().items():
            value = params.get(key, default)
            if not self._teachers_shape(key, value):
                complete[key] = value
        for unit in self.units_of(params):
            precision = f"{unit}.{self.precision_key}"
            complete[f"{unit}.sparsity"] = params.get(f"{unit}.sparsity", self.sparsity_levels[0])
            complete[precision] = params.get(precision, self.levels_of(unit)[0])
        options = self.config.compression.plan_options()
        if self.config.search.student is not None:
            options["recovery_steps"] = self.config.search.student.recovery_steps
        return CompressionPlan.from_params(complete, **options)

    def teacher_plan(self) -> CompressionPlan:
        """The dense teacher, uncompressed: what every loss is measured against."""
        return CompressionPlan(**self.config.compression.plan_options())

    def uniform_params(self, sparsity: float, precision: int | str) -> Params:
        """Every unit at one level, in the largest architecture offered; a unit that cannot take the level takes
        the nearest one it can with as many bits or more (as llama.cpp falls back), else its widest."""
        params: Params = dict(self.largest_student()) | self.teacher_structure_params()
        for unit in self.units_of(params):
            if len(self.sparsity_levels) > 1:
                params[f"{unit}.sparsity"] = sparsity
            levels = self.levels_of(unit)
            if len(levels) > 1:
                params[f"{unit}.{self.precision_key}"] = nearest_level(levels, precision)
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
        if search.speed_objective:  # left out otherwise, so studies made before speed existed still match
            scored |= {"objectives": search.objectives, "speed_threads": search.speed_threads}
            if search.objective == "scalar":
                scored["gamma"] = search.gamma
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
        if search.student is not None:  # likewise
            space["student"] = search.student.model_dump(mode="json")
        if self.unit_levels is not None:  # likewise
            space["unit_levels"] = self.unit_levels
        if search.structure is not None:  # likewise
            space["structure"] = search.structure.model_dump(mode="json")
        return json.dumps(space, sort_keys=True)
