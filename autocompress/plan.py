"""The data a trial is: an optional student architecture, then how much to prune and at which precision to
keep, per decoder block or per Linear (of the student, when there is one), and each block's own shape (its FFN
width, its attention's key/value groups, or the block removed)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from autocompress.methods import PRUNERS, QUANTIZERS
from autocompress.methods.formats import FORMATS, PER_ROW, PER_TENSOR
from autocompress.models import student_config

BIT_WIDTHS = (2, 3, 4, 5, 6, 8, 16)
MAX_SPARSITY = 0.95
Granularity = Literal["block", "linear"]
UNQUANTIZED = "fp16"  # the level name of weights kept in 16 bits (bfloat16 for a bfloat16 model)

STUDENT_PREFIX = "student."  # trial parameters of the student architecture: student.num_layers, ...
STRUCTURE_FIELDS = ("ffn", "kv_groups", "removed")  # trial parameters of a block's shape: `{block}.ffn`, ...
_N_M = re.compile(r"^(\d+):(\d+)$")
_INTEGER_LEVEL = re.compile(r"^int(\d+)(?:-(?:g(\d+)|(row)))?$")
_FORMAT_LEVEL = re.compile(rf"^({'|'.join(map(re.escape, FORMATS))})(?:-(?:g(\d+)|(row)|(tensor)))?$")
LEVEL_NAMES_HELP = (
    f"{UNQUANTIZED}, int<bits>[-g<size>|-row] (bits {', '.join(map(str, BIT_WIDTHS[:-1]))}), "
    "fp8-e4m3 or fp8-e5m2 [-g<size>|-row|-tensor], nf4[-g<size>|-row], mxfp4, nvfp4; "
    "under the gguf target llama.cpp's types q2_k..q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, iq4_xs, mxfp4, f16"
)
GGUF_METHOD = "gguf"  # the `Level.method` of a GGUF tensor type: blocks are llama.cpp's (targets.gguf.weights)
# llama.cpp's tensor types, the levels of `compression.target: gguf`, with the whole bits per weight a plan records
# for them (LayerCompression.bits): the values' own bits, not counting the scales their blocks store. A level is
# data a plan names, so its table lives here, below every target; `targets.gguf` quantizes and counts them.
GGUF_LEVELS: dict[str, int] = {
    "q2_k": 2,
    "q3_k": 3,
    "q4_k": 4,
    "q5_k": 5,
    "q6_k": 6,
    "q8_0": 8,
    "q4_0": 4,
    "q4_1": 4,
    "q5_0": 5,
    "q5_1": 5,
    "iq4_nl": 4,
    "iq4_xs": 4,
    "mxfp4": 4,
    "f16": 16,
}


class StudentArchitecture(BaseModel):
    """The student's shape; a field left None keeps the teacher's value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)

    def resolved(self, config) -> dict[str, int]:
        """Every dimension, the teacher's where not given; raises ValueError if the shape cannot be cut."""
        teacher = {
            "num_layers": config.num_hidden_layers,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "hidden_size": config.hidden_size,
        }
        shape = {key: teacher[key] if value is None else value for key, value in self.model_dump().items()}
        for key, value in shape.items():
            if value > teacher[key]:
                raise ValueError(f"student {key} {value} exceeds the teacher's {teacher[key]}")
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        teacher_group = teacher["num_attention_heads"] // teacher["num_key_value_heads"]
        if heads % kv_heads or heads // kv_heads > teacher_group:
            raise ValueError(
                f"student attention heads {heads} must be a multiple of its key/value heads {kv_heads}, "
                f"at most {teacher_group} query heads per key/value head as in the teacher"
            )
        try:
            student_config(config, shape)
        except Exception as error:  # the family's own config validation raises its own error types
            raise ValueError(f"student shape {shape} is not a valid {type(config).__name__}: {error}") from error
        return shape


class BlockStructure(BaseModel):
    """One decoder block's shape, relative to the teacher's block (`autocompress.structure` builds it).

    `ffn` is the fraction of the teacher's FFN channels kept (1: all); `kv_groups` the key/value groups kept, each
    with the teacher's query heads per group (None: all of them; 0: no attention); `removed` drops the whole block
    (its input passes on unchanged). A removed block says nothing more, so one shape has one form.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ffn: float = Field(1.0, gt=0.0, le=1.0)
    kv_groups: int | None = Field(None, ge=0)
    removed: bool = False

    @model_validator(mode="after")
    def _removed_says_nothing_more(self) -> BlockStructure:
        if self.removed and (self.ffn != 1.0 or self.kv_groups is not None):
            raise ValueError("a removed block has no FFN width or key/value groups; give removed alone")
        return self

    @model_serializer(mode="wrap")
    def _omit_the_teachers(self, handler):
        """Only what differs from the teacher's block, so plans without a shape serialize as before."""
        data = handler(self)
        return {key: value for key, value in data.items() if value != BlockStructure.model_fields[key].default}

    @property
    def is_teacher(self) -> bool:
        return self == BlockStructure()

    @property
    def has_attention(self) -> bool:
        return not self.removed and self.kv_groups != 0


@dataclass(frozen=True)
class Level:
    """What a named precision level stands for.

    `int<b>` is the plan's integer method (rtn, gptq...) at b bits in the plan's groups, `int<b>-g<size>` /
    `int<b>-row` the same in groups of `size` inputs / one group per row. A number format's name
    (`methods.formats.FORMATS`) is that format at its canonical scale layout; `-g<size>`, `-row` and, for FP8,
    `-tensor` choose another one (MXFP4 and NVFP4 fix their blocks). `fp16` keeps the weights in 16 bits.
    """

    name: str
    bits: int
    method: str | None  # the quantizer of a number format; None: the plan's (integer) method
    group_size: int | None  # None: the plan's group size (integer grids), the format's canonical one (formats)

    @property
    def is_format(self) -> bool:
        return self.method is not None


def parse_level(name: str) -> Level:
    """The level a name stands for; ValueError (one line) for a name that is none."""
    if name == UNQUANTIZED:
        return Level(name, 16, None, None)
    integer = _INTEGER_LEVEL.match(name)
    if integer and int(integer[1]) in BIT_WIDTHS[:-1]:
        group = PER_ROW if integer[3] else (int(integer[2]) if integer[2] else None)
        if group == 0:
            raise ValueError(f"precision level {name!r}: a group holds at least one input")
        return Level(name, int(integer[1]), None, group)
    number_format = _FORMAT_LEVEL.match(name)
    if number_format:
        spec = FORMATS[number_format[1]]
        if number_format[2] and int(number_format[2]) == 0:
            raise ValueError(f"precision level {name!r}: a group holds at least one input")
        group = int(number_format[2]) if number_format[2] else None
        group = PER_ROW if number_format[3] else PER_TENSOR if number_format[4] else group
        if group is not None and spec.block_size is not None:
            raise ValueError(f"precision level {name!r}: {spec.name} fixes its blocks at {spec.block_size} inputs")
        if group == PER_TENSOR and not spec.allows_per_tensor:
            raise ValueError(f"precision level {name!r}: only FP8 takes one scale per tensor")
        return Level(name, spec.bits, spec.name, group)
    if name in GGUF_LEVELS:  # llama.cpp's own tensor types, the levels of `compression.target: gguf`
        return Level(name, GGUF_LEVELS[name], GGUF_METHOD, None)
    raise ValueError(f"unknown precision level {name!r}; use {LEVEL_NAMES_HELP}")


class LayerCompression(BaseModel):
    """What one unit (a decoder block or a Linear) gets: the fraction of weights pruned, the precision kept.

    The precision is `bits` on the plan's integer grid, or a named level `format` (see `Level`), whose bits
    `bits` then holds. Names that say no more than `bits` does (`fp16`, `int4`) are stored as `bits` alone,
    so one setting has one form.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparsity: float = Field(0.0, ge=0.0, le=MAX_SPARSITY)
    bits: Literal[2, 3, 4, 5, 6, 8, 16] = 16
    format: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bits_of_the_format(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("format"), str):
            return data  # no level named (or not a name: the field's own type check says so)
        level = parse_level(data["format"])
        if "bits" in data and data["bits"] != level.bits:
            raise ValueError(f"precision level {level.name!r} stores {level.bits} bits, not {data['bits']}")
        plain = level.name == UNQUANTIZED or (not level.is_format and level.group_size is None)
        return {**data, "bits": level.bits, "format": None if plain else level.name}

    @model_serializer(mode="wrap")
    def _omit_plain_format(self, handler):
        """Leave `format` out of a plain bit-width, so such plans serialize as they did before formats."""
        data = handler(self)
        if self.format is None:
            data.pop("format", None)
        return data

    @property
    def is_identity(self) -> bool:
        return self.sparsity == 0.0 and self.bits == 16

    @property
    def level(self) -> Level:
        if self.format is not None:
            return parse_level(self.format)
        return parse_level(UNQUANTIZED if self.bits == 16 else f"int{self.bits}")


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
    structure: dict[str, BlockStructure] = Field(
        default_factory=dict, description="each named decoder block's own shape; the teacher's for the others"
    )

    @field_validator("structure")
    @classmethod
    def _teacher_blocks_unnamed(cls, structure: dict[str, BlockStructure]) -> dict[str, BlockStructure]:
        """A block at the teacher's shape is left out, so one plan has one form."""
        return {block: shape for block, shape in structure.items() if not shape.is_teacher}

    @model_serializer(mode="wrap")
    def _omit_no_structure(self, handler):
        """Leave `structure` out while every block keeps the teacher's shape, so such plans serialize (and are
        cached and fingerprinted) as before structural levels existed."""
        data = handler(self)
        if not self.structure:
            data.pop("structure", None)
        return data

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
            return self._integer_levels_have_an_integer_method()
        n, m = self.nm
        allowed = 1 - n / m
        for unit, setting in [("default", self.default), *self.layers.items()]:
            if setting.sparsity not in (0.0, allowed):
                raise ValueError(
                    f"pattern {self.pattern} keeps {n} of every {m} weights, so the sparsity of {unit} "
                    f"must be 0 or {allowed:g}, got {setting.sparsity:g}"
                )
        return self._integer_levels_have_an_integer_method()

    def _integer_levels_have_an_integer_method(self) -> CompressionPlan:
        if self.quantization not in FORMATS:
            return self
        for unit, setting in [("default", self.default), *self.layers.items()]:
            if setting.format is not None and not setting.level.is_format:
                raise ValueError(
                    f"{unit} takes the integer level {setting.format!r}, but the plan's quantization is the number "
                    f"format {self.quantization!r}; choose an integer method (rtn, gptq...)"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern: N weights kept in every M consecutive inputs; None if unstructured."""
        match = _N_M.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @classmethod
    def uniform(
        cls, sparsity: float = 0.0, bits: int = 16, format: str | None = None, **options: object
    ) -> CompressionPlan:
        """The same sparsity and precision (a bit-width, or a named level `format`) for every unit."""
        precision = {"bits": bits} if format is None else {"format": format}
        return cls(default=LayerCompression(sparsity=sparsity, **precision), **options)

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

    def to_params(self) -> dict[str, float | int | str]:
        """Flat parameters, as an Optuna trial holds them: `student.{dimension}` for each student dimension
        given, then per block of its own shape `{block}.ffn`, `{block}.kv_groups` or `{block}.removed`, then per
        unit `{unit}.sparsity`, and `{unit}.bits` or `{unit}.format` (a named level)."""
        params: dict[str, float | int | str] = {}
        if self.student is not None:
            shape = self.student.model_dump(exclude_none=True)
            params |= {f"{STUDENT_PREFIX}{dimension}": value for dimension, value in shape.items()}
        for block, shape in self.structure.items():
            params |= {f"{block}.{field}": value for field, value in shape.model_dump().items()}
        for unit, setting in self.layers.items():
            params[f"{unit}.sparsity"] = setting.sparsity
            if setting.format is None:
                params[f"{unit}.bits"] = setting.bits
            else:
                params[f"{unit}.format"] = setting.format
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, float | int | str], **options: object) -> CompressionPlan:
        """The inverse of `to_params`; `options` sets the plan-wide fields (methods, granularity...)."""
        per_unit: dict[str, dict[str, float | int | str]] = {}
        per_block: dict[str, dict[str, float | int | bool]] = {}
        student: dict[str, int] = {}
        for key, value in params.items():
            if key.startswith(STUDENT_PREFIX):
                student[key.removeprefix(STUDENT_PREFIX)] = int(value)
                continue
            unit, _, field = key.rpartition(".")
            if field in STRUCTURE_FIELDS and unit:
                per_block.setdefault(unit, {})[field] = value
                continue
            if field not in ("sparsity", "bits", "format") or not unit:
                raise ValueError(
                    f"parameter {key!r} is not of the form '<unit>.sparsity', '<unit>.bits', '<unit>.format' or "
                    "'<block>.ffn', '<block>.kv_groups', '<block>.removed'"
                )
            per_unit.setdefault(unit, {})[field] = value
        layers = {unit: LayerCompression(**fields) for unit, fields in per_unit.items()}
        if student:
            options = {**options, "student": StudentArchitecture(**student)}
        if per_block:
            options = {**options, "structure": {block: _block_of_params(fields) for block, fields in per_block.items()}}
        return cls(layers=layers, **options)


def _block_of_params(fields: Mapping[str, float | int | bool]) -> BlockStructure:
    """A block's shape from its trial parameters: a removed block's width and groups, which a search samples beside
    `removed` all the same, mean nothing."""
    if fields.get("removed"):
        return BlockStructure(removed=True)
    return BlockStructure(**{field: value for field, value in fields.items() if field != "removed"})
