"""The study config: a YAML file of model, data and compression settings, validated with one-line errors."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from autocompress.errors import UserError
from autocompress.methods.formats import FORMATS
from autocompress.plan import BIT_WIDTHS, MAX_SPARSITY, CompressionPlan, Granularity, parse_level
from autocompress.targets import (
    DEFAULT_TARGET,
    TARGET_NAMES,
    size_preset_targets,
    speed_targets,
    target_named,
    targets_serving_in_dtype,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="smollm2-135m (embedded), a hub id, a folder or a .gguf file")
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="read pickled checkpoints (.bin, .pt); they can run code")

    @model_serializer(mode="wrap")
    def _omit_default_allow_pickle(self, handler):
        """Leave allow_pickle out while it is off, so studies fingerprinted before it existed still match."""
        data = handler(self)
        if not self.allow_pickle:
            data.pop("allow_pickle", None)
        return data


class DataConfig(Section):
    source: Literal["pydoc", "dataset", "files"] = "pydoc"
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    files: list[str] = Field(default_factory=list)
    seq_len: int = Field(256, ge=8)
    calibration: int = Field(32, ge=1)
    fitness: int = Field(16, ge=1)
    heldout: int = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _source_is_complete(self) -> DataConfig:
        if self.source == "dataset" and not self.dataset:
            raise ValueError("source 'dataset' needs a dataset name in data.dataset")
        if self.source == "files" and not self.files:
            raise ValueError("source 'files' needs at least one path in data.files")
        return self


class CompressionConfig(Section):
    """Plan-wide choices: which methods, at what granularity, with which quantization groups."""

    pruning: str = "wanda"
    quantization: str = "rtn"
    pattern: str = "unstructured"
    granularity: Granularity = "block"
    group_size: int = 128
    symmetric: bool = False
    target: Literal[TARGET_NAMES] = Field(
        DEFAULT_TARGET,
        description="the runtime models ship to: artifact (ours) | vllm (compressed-tensors) | gguf (llama.cpp)",
    )
    serve_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16",
        description="target vllm: the dtype vLLM serves the model in, which the tensors left unquantized are "
        "stored (and counted) in, whatever dtype the model loads in for the search",
    )

    @model_serializer(mode="wrap")
    def _omit_default_target(self, handler):
        """Leave the target out while it is our artifact, so studies fingerprinted before targets still match."""
        data = handler(self)
        if self.target == DEFAULT_TARGET:
            data.pop("target", None)
        if not target_named(self.target).serves_in_dtype:
            data.pop("serve_dtype", None)
        return data

    @model_validator(mode="after")
    def _valid_as_plan(self) -> CompressionConfig:
        CompressionPlan(**self.plan_options())
        if "serve_dtype" in self.model_fields_set and not target_named(self.target).serves_in_dtype:
            serving = " or ".join(targets_serving_in_dtype())
            raise ValueError(f"serve_dtype: only target {serving} stores tensors in a serving dtype, not {self.target}")
        return self

    def plan_options(self) -> dict:
        """The plan-wide fields of a `CompressionPlan` (the target is the study's, not the plan's)."""
        return self.model_dump(exclude={"target", "serve_dtype"})


class LevelRange(Section):
    low: float
    high: float
    step: float = Field(gt=0)

    def levels(self) -> list[float]:
        count = round((self.high - self.low) / self.step)
        if count < 0 or abs(self.low + count * self.step - self.high) > 1e-9:
            raise ValueError(f"range {self.low}..{self.high} is not a whole number of steps of {self.step}")
        return [round(self.low + index * self.step, 10) for index in range(count + 1)]


class IntRange(Section):
    """Whole numbers from `low` to `high` in steps of `step`, e.g. {low: 256, high: 1536, step: 256}."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)
    step: int = Field(gt=0)

    def values(self) -> list[int]:
        if self.high < self.low or (self.high - self.low) % self.step:
            raise ValueError(f"range {self.low}..{self.high} is not a whole number of steps of {self.step}")
        return list(range(self.low, self.high + 1, self.step))


class DistillationConfig(Section):
    """How each student is trained to imitate the dense teacher (knowledge distillation on calibration tokens)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps; default 200 unless `tokens` is given")
    tokens: int | None = Field(None, ge=1, description="token budget instead of steps: steps = tokens / (batch x seq)")
    batch_size: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0, description="weight of the last hidden state's MSE (same hidden size)")
    ce_weight: float = Field(
        0.0, ge=0, description="weight of the next-token cross-entropy added to the KL (Hinton's hard-label term)"
    )
    weight_decay: float = Field(0.0, ge=0)
    bf16: Literal["auto", "on", "off"] = Field("auto", description="bfloat16 autocast; auto: on CUDA only")
    gradient_checkpointing: bool = False
    report_every: int = Field(25, ge=1, description="steps between KD losses on the fitness pool (Optuna reports)")
    pruner: Literal["median", "halving", "hyperband", "none"] = Field(
        "median",
        description="stop weak students early: the median rule, successive halving, or Hyperband (brackets of "
        "successive halving; one bracket in a multi-objective study)",
    )
    startup_trials: int = Field(2, ge=0, description="students trained to the end before the pruner judges any")
    reduction_factor: int = Field(3, ge=2, description="successive halving: keep 1 in this many at each rung")
    importance_windows: int = Field(
        32, ge=1, description="calibration windows the importance of blocks, heads and channels is measured on"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> DistillationConfig:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give the distillation budget as steps or as tokens, not both")
        return self

    def step_count(self, seq_len: int) -> int:
        if self.tokens is not None:
            return max(1, self.tokens // (self.batch_size * seq_len))
        return 200 if self.steps is None else self.steps


StudentDimension = list[int] | IntRange
STUDENT_DIMENSIONS = ("num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size")


class StudentSearchConfig(Section):
    """Student architectures the search may choose (each a list or a range; the teacher's value where absent),
    how they are distilled, and the optional KD recovery of compressed students."""

    num_layers: StudentDimension | None = None
    intermediate_size: StudentDimension | None = None
    num_attention_heads: StudentDimension | None = None
    num_key_value_heads: StudentDimension | None = None
    hidden_size: StudentDimension | None = None
    distillation: DistillationConfig = DistillationConfig()
    recovery_steps: int = Field(
        0, ge=0, description="KD steps after pruning a student, masks frozen, before it is quantized (0: none)"
    )

    @model_validator(mode="after")
    def _dimensions_are_valid(self) -> StudentSearchConfig:
        chosen = self.dimensions()
        if not chosen:
            raise ValueError(
                "a student section needs at least one of num_layers, intermediate_size, num_attention_heads, "
                "num_key_value_heads, hidden_size"
            )
        for name, values in chosen.items():
            if not values:
                raise ValueError(f"student {name} needs at least one value")
            if min(values) < 1:
                raise ValueError(f"student {name} values must be positive, got {values}")
        return self

    def dimensions(self) -> dict[str, list[int]]:
        """The dimensions the config names, each as its sorted distinct values."""
        chosen = {}
        for name in STUDENT_DIMENSIONS:
            given = getattr(self, name)
            if given is not None:
                chosen[name] = sorted(set(given.values() if isinstance(given, IntRange) else given))
        return chosen


class BlockDistillationConfig(Section):
    """How each structural alternative is trained to reproduce its parent sub-block's output from that sub-block's
    cached inputs (MSE on the residual stream), on calibration windows, judged on windows it was not trained on."""

    steps: int = Field(100, ge=0, description="optimizer (AdamW) steps per alternative; 0: the importance cut as is")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1, description="calibration windows per step")
    heldout_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of the calibration windows each alternative is judged on, not trained on"
    )


class StructureConfig(Section):
    """Per-block shapes the search may choose, as llama.cpp's `deci` architecture runs them: FFN widths (fractions
    of the teacher's), key/value groups (each with the teacher's query heads per group; 0: no attention, offered in
    every block but the first) and whole blocks removed (offered in every block but the first and the last)."""

    ffn: list[float] = Field(default_factory=lambda: [1.0], description="FFN widths, e.g. [1, 0.75, 0.5, 0.25]")
    kv_groups: list[int] | None = Field(
        None, description="key/value groups kept, e.g. [3, 2, 1, 0] for 3 groups; default: the teacher's only"
    )
    drop_blocks: bool = Field(False, description="whether a block may be removed altogether")
    distillation: BlockDistillationConfig = BlockDistillationConfig()

    @model_validator(mode="after")
    def _levels_are_valid(self) -> StructureConfig:
        if not self.ffn or not all(0 < fraction <= 1 for fraction in self.ffn):
            raise ValueError(f"ffn widths are fractions of the teacher's in (0, 1], got {self.ffn}")
        if self.kv_groups is not None and (not self.kv_groups or min(self.kv_groups) < 0):
            raise ValueError(f"kv_groups are counts of key/value groups, 0 or more, got {self.kv_groups}")
        if self.kv_groups is not None and max(self.kv_groups) == 0:
            raise ValueError("kv_groups: the first block keeps its attention, so offer a count above 0 too")
        if self.ffn == [1.0] and self.kv_groups is None and not self.drop_blocks:
            raise ValueError("a structure section offers at least one of ffn widths below 1, kv_groups or drop_blocks")
        return self


class Budget(Section):
    """A fixed size for a budget-aware search: the average sparsity, or the average bit-width, of the
    compressible weights (weighted by their number), which every plan the search tries keeps exactly; or a ceiling
    on the model's bytes as the study's target stores them, over named levels (formats, GGUF types) or bit-widths,
    which every plan a generation tries stays under."""

    sparsity: float | None = Field(None, ge=0.0, le=MAX_SPARSITY)
    bits: float | None = Field(None, ge=min(BIT_WIDTHS), le=max(BIT_WIDTHS))
    size: int | float | str | None = Field(
        None, description="bytes ('60MB') or a fraction of the dense bytes ('40%'), as search.max_size is spelt"
    )

    @model_validator(mode="after")
    def _one_dimension(self) -> Budget:
        if sum(value is not None for value in (self.sparsity, self.bits, self.size)) != 1:
            raise ValueError(
                "a budget names exactly one of sparsity (e.g. {sparsity: 0.6}), bits ({bits: 3.0}) or size "
                "({size: '40%'})"
            )
        if self.size is not None:
            size_limit(self.size)
        return self

    @property
    def dimension(self) -> Literal["sparsity", "bits", "size"]:
        return "sparsity" if self.sparsity is not None else "bits" if self.bits is not None else "size"

    @property
    def average(self) -> float:
        """The average a sparsity or bits budget keeps (a size budget has `max_bytes` instead)."""
        if self.size is not None:
            raise ValueError("a size budget is a ceiling in bytes, not an average")
        return self.sparsity if self.sparsity is not None else self.bits

    def max_bytes(self, dense_bytes: int, config: Config | None = None) -> int:
        """A size budget's ceiling in bytes, for a model of `dense_bytes` dense bytes (and of `config`'s study, for
        a preset's size)."""
        return size_limit(self.size).max_bytes(dense_bytes, config)


class GenerationsConfig(Section):
    """EvoPress's selection for a budget search: each generation scores `offspring` mutations of the best plan (and
    the plan itself) on the first `stages[0]` of the fitness pool, keeps the best `survivors[0]`, scores those on
    `stages[1]`, and so on; the plans scored on the whole pool are recorded as trials. The defaults fit a CPU demo
    (a generation costs about 2.5 full evaluations on a 16-window pool); a GPU night takes more offspring, e.g.
    64 with survivors [8, 2, 1] as EvoPress does for sparsity."""

    offspring: int = Field(16, ge=1, description="mutations of the best plan scored in each generation")
    stages: list[float] = Field(
        default_factory=lambda: [0.0625, 0.25, 1.0],
        description="increasing fractions of the fitness pool the candidates are scored on in turn, ending with 1.0",
    )
    survivors: list[int] = Field(
        default_factory=lambda: [4, 2, 1],
        description="candidates kept after each stage, decreasing and ending with 1 (the next parent)",
    )

    @model_validator(mode="after")
    def _stages_select(self) -> GenerationsConfig:
        stages, survivors = self.stages, self.survivors
        if not stages or stages[-1] != 1.0 or any(not 0 < f <= 1 for f in stages) or stages != sorted(set(stages)):
            raise ValueError(f"stages must be increasing fractions in (0, 1] ending with 1.0, got {stages}")
        if len(survivors) != len(stages):
            raise ValueError(f"survivors needs one count per stage ({len(stages)}), got {survivors}")
        if survivors[-1] != 1 or survivors != sorted(set(survivors), reverse=True):
            raise ValueError(f"survivors must decrease strictly and end with 1, got {survivors}")
        if survivors[0] > self.offspring:
            raise ValueError(f"survivors[0] ({survivors[0]}) cannot exceed the offspring ({self.offspring})")
        return self


def duration_seconds(text: str) -> float:
    """Seconds from '90', '90s', '30m', '8h' or '1d'; ValueError (one line) for anything else."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"invalid duration {text!r}; use e.g. 90s, 30m, 8h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive and finite, got {text!r}")
    return seconds


def evenly_spaced(levels: list[float]) -> bool:
    steps = [high - low for low, high in itertools.pairwise(levels)]
    return all(abs(step - steps[0]) <= 1e-9 for step in steps)


OBJECTIVES = ("loss", "size")  # a study's objectives by default; speed may join them


class SearchConfig(Section):
    """What a search may choose per unit, and how it scores and samples plans."""

    sparsity: list[float] | LevelRange = Field(default_factory=lambda: [0.0])
    bits: list[int] = Field(default_factory=lambda: [16])
    formats: list[str] | None = Field(
        None,
        description="named precision levels each unit may take instead of `bits`, e.g. [int4-g128, nf4, mxfp4, "
        "nvfp4, fp8-e4m3, int8, fp16]; see autocompress.plan.parse_level",
    )
    objective: Literal["pareto", "scalar"] = Field(
        "pareto",
        description="pareto: each of `objectives` is a direction of the study (a frontier); scalar: one value, "
        "alpha*Loss + beta*Size (- gamma*Speed with speed among the objectives)",
    )
    objectives: list[Literal["loss", "size", "speed"]] = Field(
        default_factory=lambda: list(OBJECTIVES),
        description="[loss, size] (the default), or [loss, size, speed]: speed is the predicted decode tokens/s "
        "of the target's runtime (gguf: llama.cpp's speed table), maximized; fixed when the study is created",
    )
    loss: Literal["kl", "ce"] = "kl"
    alpha: float = Field(1.0, ge=0, description="weight of Loss in alpha*Loss + beta*Size")
    beta: float = Field(1.0, ge=0, description="weight of Size (fraction of the dense fp16 bytes)")
    gamma: float = Field(
        1.0,
        ge=0,
        description="weight of Speed in the scalar objective and the frontier's ranking (with speed among the "
        "objectives): the predicted decode tokens/s as a multiple of the dense model's",
    )
    min_speed: float | str | None = Field(
        None,
        description="a floor on the predicted decode speed: tokens/s (150), a multiple of the dense model's ('1.2x') "
        "or of a llama.cpp preset's ('1.3x q4_k_m'); plans under it are infeasible, as plans over max_size are",
    )
    speed_threads: int | None = Field(
        None, ge=1, description="CPU threads the runtime's speed is predicted for (default: all this process may use)"
    )
    max_size: int | float | str | None = Field(
        None, description="bytes (80000000, '80MB') or a fraction of dense ('50%', 0.5); see `size_limit`"
    )
    sampler: Literal["tpe", "nsga2", "gp", "random", "evolution"] = Field(
        "tpe", description="evolution: the budget-aware search (level-switch mutations); the default with a budget"
    )
    seed: int = 0
    seeds: Literal["levels", "grid", "none"] = "levels"
    n_trials: int = Field(40, ge=0)
    timeout: float | None = Field(
        None,
        description="stop starting trials after this long, set-up excluded: seconds or a duration (90s, 30m, 8h); "
        "`search --timeout` overrides it",
    )
    max_failures: int = Field(5, ge=1, description="failed trials in a row after which the search stops")
    heartbeat_interval: int = Field(10, ge=1, description="seconds between heartbeats of a running trial (RDB)")
    grace_period: int = Field(60, ge=1, description="seconds without heartbeat before a trial is re-run (RDB)")
    budget: Budget | None = Field(
        None, description="search only plans at this average sparsity or bit-width, e.g. {sparsity: 0.6}"
    )
    max_mutations: int = Field(3, ge=1, description="most level switches one offspring of the evolution makes")
    stages: list[float] | None = Field(
        None,
        description="staged fitness: fractions of the fitness pool scored in turn, e.g. [0.25, 0.5, 1.0]; a plan "
        "whose partial loss is clearly worse than a no larger frontier member's is pruned. Default: "
        "[0.25, 0.5, 1.0] with a budget, else [1.0] (off)",
    )
    stage_margin: float | None = Field(
        None,
        ge=0,
        description="prune after a stage when the partial loss exceeds a no larger frontier member's (on the same "
        "tokens) by more than this fraction. Default: 0 with a budget (an offspring must keep up with the best plan, "
        "as in EvoPress' selection), else 0.05",
    )
    baselines: list[Literal["uniform", "owl", "sensitivity", "additive"]] | None = Field(
        None,
        description="allocations enqueued as seed trials, at the budget or at each level of a free search. "
        "Default: uniform, owl and sensitivity with an average budget, uniform with a size budget, none without (the "
        "`seeds` uniform plans still are). additive (size budgets only): each unit's error at each level measured "
        "alone, the least summed error under the ceiling solved as a knapsack over bytes",
    )
    owl_threshold: float = Field(5.0, gt=0, description="OWL: a weight is an outlier above this many times the mean")
    owl_spread: float | None = Field(
        None, gt=0, description="OWL: the largest shift from the budget (default 0.08 sparsity, 0.5 bits)"
    )
    profile_windows: int | None = Field(
        None, ge=1, description="fitness windows the per-unit error profile is measured on (default: a quarter)"
    )
    database: Literal["auto", "on", "off"] = Field(
        "auto",
        description="layer-variant database on disk; auto: on when a method needs the Hessian (SparseGPT, GPTQ)",
    )
    hessian_memory_mb: float = Field(
        4000,
        gt=0,
        description="MB (10^6 bytes, on the model's device) of float32 Hessians held at once while the layer-variant "
        "database is built: consecutive blocks are calibrated together while theirs fit (at least one block), and "
        "dropped once their variants are stored",
    )
    reuse_memory_mb: float = Field(
        1000,
        ge=0,
        description="MB (10^6 bytes, on the model's device) for decoder-block inputs on the fitness pool kept from "
        "trial to trial, so a plan that differs from the previous one from block k on runs blocks k.. only; a block "
        "costs fitness windows x seq_len x hidden_size x bytes per element of the dtype; 0: off",
    )
    student: StudentSearchConfig | None = Field(
        None, description="distilled student architectures searched beside the teacher's compression plans"
    )
    generations: GenerationsConfig | None = Field(
        None,
        description="with a budget: EvoPress's generations, selected in stages, only the plans scored on the whole "
        "fitness pool recorded as trials (instead of one trial per scored plan)",
    )
    structure: StructureConfig | None = Field(
        None, description="per-block FFN widths, key/value groups and removed blocks (llama.cpp's deci architecture)"
    )

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout_seconds(cls, timeout: object) -> object:
        return duration_seconds(timeout) if isinstance(timeout, str) else timeout

    @field_validator("formats")
    @classmethod
    def _known_levels(cls, formats: list[str] | None) -> list[str] | None:
        for name in formats or ():
            parse_level(name)
        return formats

    _size_limit: SizeLimit | None = PrivateAttr(None)

    def max_bytes(self, dense_bytes: int, config: Config | None = None) -> int | None:
        """The size limit in bytes for a model of `dense_bytes` dense bytes (and of `config`'s study, for a
        preset's size); None without a limit."""
        return None if self._size_limit is None else self._size_limit.max_bytes(dense_bytes, config)

    @model_validator(mode="before")
    @classmethod
    def _budget_chooses_evolution(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("budget") is not None and "sampler" not in data:
            return {**data, "sampler": "evolution"}
        return data

    @model_validator(mode="after")
    def _levels_are_valid(self) -> SearchConfig:
        levels = self.sparsity_levels()
        if not levels or not all(0.0 <= level <= MAX_SPARSITY for level in levels):
            raise ValueError(f"sparsity levels must lie in [0, {MAX_SPARSITY}], got {levels}")
        if not self.bits or not set(self.bits) <= set(BIT_WIDTHS):
            raise ValueError(f"bits must be chosen from {list(BIT_WIDTHS)}, got {self.bits}")
        if self.formats is not None:
            self._formats_are_valid()
        self._size_limit = None if self.max_size is None else size_limit(self.max_size)
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period} s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval} s), or other processes re-run trials that are still alive"
            )
        if self.stages is not None:
            stages = self.stages
            if not stages or stages[-1] != 1.0 or any(not 0 < f <= 1 for f in stages) or stages != sorted(set(stages)):
                raise ValueError(f"stages must be increasing fractions in (0, 1] ending with 1.0, got {stages}")
        self._budget_is_valid()
        if self.generations is not None:
            if self.budget is None:
                raise ValueError("generations select plans at a budget; add budget, e.g. {sparsity: 0.6}")
            if self.stages is not None:
                raise ValueError("a generations search is staged by generations.stages; drop search.stages")
        if self.student is not None and self.budget is not None:
            raise ValueError("a budget search keeps the teacher's shape; drop search.student or search.budget")
        if self.speed_objective and self.generations is not None:
            raise ValueError(
                "objectives: generations select the lowest loss under a budget, one objective; keep [loss, size] and "
                "give the speed as a floor, search.min_speed"
            )
        return self

    def _formats_are_valid(self) -> None:
        """Formats replace the bit-widths: one list of precision levels, each a name `parse_level` knows."""
        if not self.formats:
            raise ValueError("formats lists at least one precision level, e.g. [int4-g128, nf4, fp8-e4m3]")
        if self.bits != [16]:
            raise ValueError("give the precision levels in bits or in formats, not both (formats may hold int4...)")
        if self.budget is not None and self.budget.dimension != "size":
            raise ValueError(
                "an average budget chooses among bits, not formats; give a size budget ({size: '40%'}) or list bits"
            )
        if self.baselines and (self.budget is None or self.budget.dimension != "size"):
            raise ValueError("baselines (uniform, owl, sensitivity) allocate bits, not formats; drop baselines")

    def _budget_is_valid(self) -> None:
        if "additive" in self.baseline_names() and (self.budget is None or self.budget.dimension != "size"):
            raise ValueError("the additive baseline allocates bytes under a size budget; add budget: {size: ...}")
        if self.budget is None:
            if self.sampler == "evolution":
                raise ValueError("the evolution sampler needs a budget, e.g. budget: {sparsity: 0.6}")
            return
        if self.sampler != "evolution":
            raise ValueError(f"a budget search uses the evolution sampler, not {self.sampler!r}")
        dimension = self.budget.dimension
        if dimension == "size":
            if self.generations is None:
                raise ValueError("a size budget is searched in generations; add search.generations (e.g. {})")
            if len(self.sparsity_levels()) != 1 or len(self.precision_levels()) < 2:
                raise ValueError("a size budget needs a single sparsity level and two or more precision levels")
            if set(self.baseline_names()) - {"uniform", "additive"}:
                raise ValueError(
                    "a size budget's baselines are uniform and additive (OWL and sensitivity keep an average)"
                )
            return
        levels = self.levels(dimension)
        other = "bits" if dimension == "sparsity" else "sparsity"
        if len(self.levels(other)) != 1:
            raise ValueError(f"a {dimension} budget needs a single {other} level, got {self.levels(other)}")
        if len(levels) < 2 or not evenly_spaced(levels):
            raise ValueError(f"a {dimension} budget needs two or more evenly spaced {dimension} levels, got {levels}")
        if not levels[0] <= self.budget.average <= levels[-1]:
            raise ValueError(f"the budget {self.budget.average} lies outside the {dimension} levels {levels}")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, objectives: list[str]) -> list[str]:
        if len(set(objectives)) != len(objectives) or not {"loss", "size"} <= set(objectives):
            raise ValueError(f"give [loss, size] or [loss, size, speed], got {objectives}")
        return [name for name in (*OBJECTIVES, "speed") if name in objectives]  # one order: the study's directions

    @field_validator("min_speed")
    @classmethod
    def _speed_floor(cls, min_speed: float | str | None) -> float | str | None:
        if min_speed is not None:
            speed_floor(min_speed)
        return min_speed

    @property
    def speed_objective(self) -> bool:
        """Whether speed is one of the study's objectives."""
        return "speed" in self.objectives

    @property
    def uses_speed(self) -> bool:
        """Whether trials predict their speed: as an objective, or against a floor."""
        return self.speed_objective or self.min_speed is not None

    def directions(self) -> list[str]:
        """The study's Optuna directions: one per objective (speed maximized), or the scalar objective's one."""
        if self.objective == "scalar":
            return ["minimize"]
        return ["maximize" if name == "speed" else "minimize" for name in self.objectives]

    def levels(self, dimension: str) -> list[float] | list[int]:
        return self.sparsity_levels() if dimension == "sparsity" else self.bit_levels()

    def stage_fractions(self) -> list[float]:
        if self.generations is not None:  # seeds keep their losses on the windows a generation selects on
            return list(self.generations.stages)
        if self.stages is not None:
            return list(self.stages)
        return [0.25, 0.5, 1.0] if self.budget is not None else [1.0]

    def margin(self) -> float:
        if self.stage_margin is not None:
            return self.stage_margin
        return 0.0 if self.budget is not None else 0.05

    def baseline_names(self) -> list[str]:
        if self.baselines is not None:
            return list(dict.fromkeys(self.baselines))
        if self.budget is not None and self.budget.dimension == "size":
            return ["uniform"]
        return ["uniform", "owl", "sensitivity"] if self.budget is not None else []

    def sparsity_levels(self) -> list[float]:
        levels = self.sparsity.levels() if isinstance(self.sparsity, LevelRange) else self.sparsity
        return sorted(set(levels))

    def bit_levels(self) -> list[int]:
        return sorted(set(self.bits))

    def precision_levels(self) -> list[int] | list[str]:
        """The precision levels a unit may take, fewest bits first: the format names, or else the bit-widths.
        Formats of equal bits keep the order the config lists them in."""
        if self.formats is None:
            return self.bit_levels()
        return sorted(dict.fromkeys(self.formats), key=lambda name: parse_level(name).bits)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
SIZE_SPELLINGS = (
    "bytes as a whole number (80000000) or with a unit ('80MB', '1.5GiB'), a fraction of dense ('50%', 0.5), "
    "or a llama.cpp preset's file (q4_k_m)"
)


@dataclass(frozen=True)
class SizeLimit:
    """A parsed size limit: a number of bytes, a fraction of the dense (16-bit) model's bytes, or the file llama.cpp
    writes of the model with a preset (`Target.preset_ceiling`: the study's config sizes it)."""

    bytes: int | None = None
    fraction: float | None = None
    preset: str | None = None

    def max_bytes(self, dense_bytes: int, config: Config | None = None) -> int:
        if self.preset is not None:
            if config is None:
                raise ValueError(f"size {self.preset!r}: a preset's size is the study's model's; no config to size it")
            return target_named(config.compression.target).preset_ceiling(config, self.preset)
        return self.bytes if self.bytes is not None else int(self.fraction * dense_bytes)


def size_limit(value: float | str) -> SizeLimit:
    """Parse a size limit, refusing the spellings that could mean two things.

    Bytes: a whole number (80000000, '80000000') or a number with a unit ('80MB', '1.5GiB'). A fraction of the
    dense bytes: a percentage ('50%', '150%') or a number strictly between 0 and 1 (0.5). Anything else, such as
    1.5 (1.5 bytes, or 150%?), 1.0 or a non-positive size, is a ValueError.
    """
    if isinstance(value, bool):
        raise ValueError(f"size {value!r} is not a size; give {SIZE_SPELLINGS}")
    name = str(value).strip().lower()
    if name[:1].isalpha():  # a runtime's preset, llama.cpp's (sized once the model is known), or a misspelt one
        owners = size_preset_targets()
        if not any(name in owner.size_presets() for owner in owners):
            kinds = " or ".join(f"{owner.runtime} preset" for owner in owners)
            names = ", ".join(preset for owner in owners for preset in owner.size_presets())
            raise ValueError(f"size {value!r} is not a size nor a {kinds} ({names})")
        return SizeLimit(preset=name)
    text = str(value).strip().lower().replace(" ", "").replace("_", "")
    unit = text.lstrip("+-0123456789.e") if not text.endswith("%") else "%"
    number_text = text[: len(text) - len(unit)]
    try:
        number = float(number_text)
    except ValueError:
        raise ValueError(f"size {value!r} is not a size; give {SIZE_SPELLINGS}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"size {value!r} must be positive")
    if unit == "%":
        return SizeLimit(fraction=number / 100)
    if unit:
        if unit not in _SIZE_UNITS:
            raise ValueError(f"size {value!r}: unknown unit {unit!r}; use B, kB, MB, GB, TB, KiB, MiB or GiB")
        return SizeLimit(bytes=int(number * _SIZE_UNITS[unit]))
    if isinstance(value, int) or number_text.isdigit():
        return SizeLimit(bytes=int(number_text))
    if number < 1:
        return SizeLimit(fraction=number)
    raise ValueError(f"size {value!r} is ambiguous (bytes, or a multiple of dense?); give {SIZE_SPELLINGS}")


SPEED_SPELLINGS = (
    "tokens/s (150), a multiple of the dense model's predicted speed ('1.2x') or of a llama.cpp preset's "
    "('1.3x q4_k_m')"
)


@dataclass(frozen=True)
class SpeedFloor:
    """A parsed speed floor: decode tokens/s, or a multiple of the dense model's (`preset` None) or a preset's
    predicted decode tokens/s."""

    tokens_per_s: float | None = None
    multiple: float | None = None
    preset: str | None = None

    def tokens(self, dense_tps: float, preset_tps: float | None = None) -> float:
        """The floor in tokens/s, given the dense model's predicted speed and, for a preset's multiple, the
        preset's."""
        if self.tokens_per_s is not None:
            return self.tokens_per_s
        return self.multiple * (dense_tps if self.preset is None else preset_tps)

    def __str__(self) -> str:
        if self.tokens_per_s is not None:
            return f"{self.tokens_per_s:g} tokens/s"
        return f"{self.multiple:g}x {'the dense model' if self.preset is None else self.preset}"


def speed_floor(value: float | str) -> SpeedFloor:
    """Parse a speed floor (`search.min_speed`, `--min-speed`): a positive number of decode tokens/s, 'Nx' (N times
    the dense model's predicted tokens/s) or 'Nx PRESET' (N times a llama.cpp preset's); ValueError (one line)
    for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"speed {value!r} is not a speed; give {SPEED_SPELLINGS}")
    text = str(value).strip().lower()
    number_text, _, rest = text.partition("x") if "x" in text else (text, "", "")
    try:
        number = float(number_text)
    except ValueError:
        raise ValueError(f"speed {value!r} is not a speed; give {SPEED_SPELLINGS}") from None
    if not number > 0 or not math.isfinite(number):
        raise ValueError(f"speed {value!r} must be positive and finite")
    if "x" not in text:
        return SpeedFloor(tokens_per_s=number)
    preset = rest.strip() or None
    if preset is not None:
        names = [name for owner in size_preset_targets() for name in owner.size_presets()]
        if preset not in names:
            raise ValueError(f"speed {value!r}: {preset!r} is not a llama.cpp preset ({', '.join(names)})")
    return SpeedFloor(multiple=number, preset=preset)


def max_bytes_for(given: str | None, config: Config, dense_bytes: int | None) -> int | None:
    """The size limit in bytes: the command line's `--max-size` if given, else the config's `search.max_size`;
    None without either, or without the dense size to resolve a fraction against."""
    if dense_bytes is None:
        return None
    if given is None:
        return config.search.max_bytes(dense_bytes, config)
    try:
        return size_limit(given).max_bytes(dense_bytes, config)
    except ValueError as error:
        raise UserError(f"--max-size: {error}") from error


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    compression: CompressionConfig = CompressionConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _sparsity_levels_fit_the_pattern(self) -> Config:
        nm = CompressionPlan(**self.compression.plan_options()).nm
        if nm is None:
            return self
        allowed = 1 - nm[0] / nm[1]
        levels = self.search.sparsity_levels()
        if not set(levels) <= {0.0, allowed}:
            raise ValueError(
                f"search.sparsity: pattern {self.compression.pattern} keeps {nm[0]} of every {nm[1]} weights, so "
                f"the sparsity levels may only be 0 and {allowed:g}, got {levels}"
            )
        return self

    @model_validator(mode="after")
    def _structure_ships(self) -> Config:
        if self.search.structure is None:
            return self
        if not target_named(self.compression.target).runs_structure:
            raise ValueError(
                "search.structure: structural levels ship as llama.cpp's deci architecture, so far under "
                f"compression.target gguf only, not {self.compression.target}"
            )
        if self.search.student is not None:
            raise ValueError("search.structure: a smaller architecture is made one way; drop search.student")
        return self

    @model_validator(mode="after")
    def _presets_size_gguf_files(self) -> Config:
        sizes = {
            "search.max_size": self.search.max_size,
            "search.budget.size": getattr(self.search.budget, "size", None),
        }
        for where, size in sizes.items():
            preset = None if size is None else size_limit(size).preset
            if preset is not None and preset not in target_named(self.compression.target).size_presets():
                owner = next(owner for owner in size_preset_targets() if preset in owner.size_presets())
                raise ValueError(
                    f"{where}: {preset} names a {owner.runtime} file's size, a budget of target {owner.name} only"
                )
        return self

    @model_validator(mode="after")
    def _target_predicts_speed(self) -> Config:
        search = self.search
        if not search.uses_speed or target_named(self.compression.target).predicts_speed:
            return self
        where = "search.objectives" if search.speed_objective else "search.min_speed"
        names = ", ".join(speed_targets())
        raise ValueError(
            f"{where}: speed is predicted by a speed model of the target's runtime, which compression.target "
            f"{names} has and {self.compression.target} has not"
        )

    @model_validator(mode="after")
    def _target_runs_the_levels(self) -> Config:
        target_named(self.compression.target).check_config(self)
        return self

    @model_validator(mode="after")
    def _integer_formats_have_an_integer_method(self) -> Config:
        method = self.compression.quantization
        if method not in FORMATS:
            return self
        if self.search.formats is None and not set(self.search.bits) <= {FORMATS[method].bits, 16}:
            raise ValueError(
                f"search.bits: the number format {method!r} (compression.quantization) stores "
                f"{FORMATS[method].bits}-bit values, so bits may only be {FORMATS[method].bits} or 16, "
                f"got {self.search.bit_levels()}"
            )
        for name in self.search.formats or ():
            level = parse_level(name)
            if not level.is_format and level.bits < 16:
                raise ValueError(
                    f"search.formats: {name} is an integer grid, but compression.quantization is the number format "
                    f"{method!r}; choose an integer method there (rtn, gptq...)"
                )
        return self


def describe_validation_error(error: ValidationError) -> str:
    """The first problem as `section.field: message`, with a count of the others."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{location}: {message}{more}" if location else f"{message}{more}"  # a whole-config check names its fields


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"config {path}: cannot read it ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise UserError(f"config {path}: not a text file (byte {error.start} is not UTF-8)") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path}: invalid YAML{where}") from error
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: expected a mapping of sections (model, data, ...)")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"config {path}: {describe_validation_error(error)}") from error
