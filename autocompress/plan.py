"""The data a trial is: an optional student architecture, then how much to prune and how many bits to keep,
per decoder block or per Linear (of the student, when there is one)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autocompress.methods import PRUNERS, QUANTIZERS
from autocompress.methods.distillation import StudentArchitecture

BIT_WIDTHS = (2, 3, 4, 5, 6, 8, 16)
MAX_SPARSITY = 0.95
Granularity = Literal["block", "linear"]

STUDENT_PREFIX = "student."  # trial parameters of the student architecture: student.num_layers, ...
_N_M = re.compile(r"^(\d+):(\d+)$")


class LayerCompression(BaseModel):
    """What one unit (a decoder block or a Linear) gets: the fraction of weights pruned, the bits kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparsity: float = Field(0.0, ge=0.0, le=MAX_SPARSITY)
    bits: Literal[2, 3, 4, 5, 6, 8, 16] = 16

    @property
    def is_identity(self) -> bool:
        return self.sparsity == 0.0 and self.bits == 16


class CompressionPlan(BaseModel):
    """A frozen, validated, JSON-serializable compression plan.

    `default` applies to every unit not named in `layers`. Units are named as the model names them:
    a decoder block (`model.layers.3`) when granularity is "block", a Linear
    (`model.layers.3.mlp.down_proj`) when it is "linear".

    With a `student`, the plan is applied in order distil → prune → quantize: the student is cut from the
    teacher and distilled, and the units name the student's own blocks. `recovery_steps` > 0 adds a short
    knowledge-distillation fine-tune after pruning (masks frozen), before quantizing (so the grid is computed
    on the recovered weights and never left). Such plans build a new model: `autocompress.students.realize_plan`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: LayerCompression = LayerCompression()
    layers: dict[str, LayerCompression] = Field(default_factory=dict)
    granularity: Granularity = "block"
    pruning: str = "wanda"
    pattern: str = "unstructured"
    quantization: str = "rtn"
    group_size: int = Field(128, description="Weights sharing one scale along the input dimension; -1: per row.")
    symmetric: bool = False
    student: StudentArchitecture | None = None
    recovery_steps: int = Field(0, ge=0, description="KD steps after pruning, masks frozen, before quantizing")

    @field_validator("pruning")
    @classmethod
    def _known_pruner(cls, name: str) -> str:
        if name not in PRUNERS:
            raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(sorted(PRUNERS))}")
        return name

    @field_validator("quantization")
    @classmethod
    def _known_quantizer(cls, name: str) -> str:
        if name not in QUANTIZERS:
            raise ValueError(f"unknown quantization method {name!r}; known: {', '.join(sorted(QUANTIZERS))}")
        return name

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern: str) -> str:
        if pattern == "unstructured":
            return pattern
        match = _N_M.match(pattern)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M, got {pattern!r}")
        return pattern

    @field_validator("group_size")
    @classmethod
    def _valid_group_size(cls, group_size: int) -> int:
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size must be a positive integer or -1 (per row), got {group_size}")
        return group_size

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self) -> CompressionPlan:
        if self.nm is None:
            return self
        n, m = self.nm
        allowed = 1 - n / m
        for unit, setting in [("default", self.default), *self.layers.items()]:
            if setting.sparsity not in (0.0, allowed):
                raise ValueError(
                    f"pattern {self.pattern} keeps {n} of every {m} weights, so the sparsity of {unit} "
                    f"must be 0 or {allowed:g}, got {setting.sparsity:g}"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern: N weights kept in every M consecutive inputs; None if unstructured."""
        match = _N_M.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @classmethod
    def uniform(cls, sparsity: float = 0.0, bits: int = 16, **options: object) -> CompressionPlan:
        """The same sparsity and bit-width for every unit."""
        return cls(default=LayerCompression(sparsity=sparsity, bits=bits), **options)

    def setting(self, linear_name: str, block_name: str) -> LayerCompression:
        """The compression a Linear gets, given its own name and the name of its decoder block."""
        unit = linear_name if self.granularity == "linear" else block_name
        return self.layers.get(unit, self.default)

    def check_units(self, known_units: Iterable[str]) -> None:
        """Raise ValueError if the plan names a unit the model does not have."""
        unknown = sorted(set(self.layers) - set(known_units))
        if unknown:
            raise ValueError(
                f"plan names {len(unknown)} {self.granularity} unit(s) the model does not have, e.g. {unknown[0]!r}"
            )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        return cls.model_validate_json(text)

    @property
    def trains(self) -> bool:
        """Whether applying the plan trains weights (a student, or a recovery fine-tune)."""
        return self.student is not None or self.recovery_steps > 0

    def to_params(self) -> dict[str, float | int]:
        """Flat parameters, as an Optuna trial holds them: `student.{dimension}` for each student dimension
        given, then per unit `{unit}.sparsity`, `{unit}.bits`."""
        params: dict[str, float | int] = {}
        if self.student is not None:
            shape = self.student.model_dump(exclude_none=True)
            params |= {f"{STUDENT_PREFIX}{dimension}": value for dimension, value in shape.items()}
        for unit, setting in self.layers.items():
            params[f"{unit}.sparsity"] = setting.sparsity
            params[f"{unit}.bits"] = setting.bits
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, float | int], **options: object) -> CompressionPlan:
        """The inverse of `to_params`; `options` sets the plan-wide fields (methods, granularity...)."""
        per_unit: dict[str, dict[str, float | int]] = {}
        student: dict[str, int] = {}
        for key, value in params.items():
            if key.startswith(STUDENT_PREFIX):
                student[key.removeprefix(STUDENT_PREFIX)] = int(value)
                continue
            unit, _, field = key.rpartition(".")
            if field not in ("sparsity", "bits") or not unit:
                raise ValueError(f"parameter {key!r} is not of the form '<unit>.sparsity' or '<unit>.bits'")
            per_unit.setdefault(unit, {})[field] = value
        layers = {unit: LayerCompression(**fields) for unit, fields in per_unit.items()}
        if student:
            options = {**options, "student": StudentArchitecture(**student)}
        return cls(layers=layers, **options)
