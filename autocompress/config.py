"""The study config: a YAML file of model, data and compression settings, validated with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autocompress.errors import UserError
from autocompress.plan import BIT_WIDTHS, MAX_SPARSITY, CompressionPlan, Granularity


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="smollm2-135m (embedded), a hub id, a folder or a .gguf file")
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False


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

    @model_validator(mode="after")
    def _valid_as_plan(self) -> CompressionConfig:
        CompressionPlan(**self.plan_options())
        return self

    def plan_options(self) -> dict:
        return self.model_dump()


class LevelRange(Section):
    low: float
    high: float
    step: float = Field(gt=0)

    def levels(self) -> list[float]:
        count = round((self.high - self.low) / self.step)
        if count < 0 or abs(self.low + count * self.step - self.high) > 1e-9:
            raise ValueError(f"range {self.low}..{self.high} is not a whole number of steps of {self.step}")
        return [round(self.low + index * self.step, 10) for index in range(count + 1)]


class SearchConfig(Section):
    """What a search may choose per unit, and how it scores and samples plans."""

    sparsity: list[float] | LevelRange = Field(default_factory=lambda: [0.0])
    bits: list[int] = Field(default_factory=lambda: [16])
    objective: Literal["pareto", "scalar"] = "pareto"
    loss: Literal["kl", "ce"] = "kl"
    alpha: float = Field(1.0, ge=0, description="weight of Loss in alpha*Loss + beta*Size")
    beta: float = Field(1.0, ge=0, description="weight of Size (fraction of the dense fp16 bytes)")
    max_size: float | str | None = Field(None, description="bytes, or a fraction of dense such as 0.5 or '50%'")
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    seed: int = 0
    seeds: Literal["levels", "grid", "none"] = "levels"
    n_trials: int = Field(40, ge=0)
    heartbeat_interval: int = Field(10, ge=1, description="seconds between heartbeats of a running trial (RDB)")
    grace_period: int = Field(60, ge=1, description="seconds without heartbeat before a trial is re-run (RDB)")

    @model_validator(mode="after")
    def _levels_are_valid(self) -> SearchConfig:
        levels = self.sparsity_levels()
        if not levels or not all(0.0 <= level <= MAX_SPARSITY for level in levels):
            raise ValueError(f"sparsity levels must lie in [0, {MAX_SPARSITY}], got {levels}")
        if not self.bits or not set(self.bits) <= set(BIT_WIDTHS):
            raise ValueError(f"bits must be chosen from {list(BIT_WIDTHS)}, got {self.bits}")
        if self.max_size is not None:
            parse_size(self.max_size, dense_bytes=1)
        return self

    def sparsity_levels(self) -> list[float]:
        levels = self.sparsity.levels() if isinstance(self.sparsity, LevelRange) else self.sparsity
        return sorted(set(levels))

    def bit_levels(self) -> list[int]:
        return sorted(set(self.bits))


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: float | str, dense_bytes: int) -> int:
    """A size limit in bytes: a fraction of dense (0.5, '50%'), or bytes (123456, '80MB', '1.5GiB')."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * dense_bytes)
        number = float(text)
        return int(number * dense_bytes) if number <= 1 else int(number)
    except ValueError:
        pass
    unit = text.lstrip("0123456789.")
    number_text = text[: len(text) - len(unit)]
    if unit not in _SIZE_UNITS or not number_text:
        raise ValueError(f"size {value!r} is neither a fraction (0.5, '50%') nor bytes ('80MB', '1.5GiB')")
    return int(float(number_text) * _SIZE_UNITS[unit])


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    compression: CompressionConfig = CompressionConfig()
    search: SearchConfig = SearchConfig()


def describe_validation_error(error: ValidationError) -> str:
    """The first problem as `section.field: message`, with a count of the others."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{location}: {message}{more}"


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"config {path}: cannot read it ({error.strerror or error})") from error
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
