"""The study config: a YAML file of model, data and compression settings, validated with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autocompress.errors import UserError
from autocompress.plan import CompressionPlan, Granularity


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


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    compression: CompressionConfig = CompressionConfig()


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
