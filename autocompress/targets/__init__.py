"""Deployment targets: the runtime a study's models ship to (`compression.target`), looked up by name here.

This module is the registry, the one list of targets: each name, the module holding its `TARGET` (a
`targets.base.Target`), the export format it writes, and whether its own runtime judges its files. A target's
module is imported only when the target is named, as it imports its runtime's libraries.

- `artifact` (`targets.artifact`): our own bit-packed format, whose bytes each level's codec counts
  (`codecs.stored_bytes`); it stores every level and any sparsity;
- `vllm` (`targets.vllm`): compressed-tensors for vLLM;
- `gguf` (`targets.gguf`): llama.cpp's file, whose units include the embedding and the output matrix and whose size
  is the file's, header included; llama.cpp judges its files.

The first two store each compressible Linear on its own (`targets.linear.LinearTarget`). To add a target, write its
module (or folder) with a `TARGET` and add one line below; docs/architecture.md walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autocompress.targets.base import Target


@dataclass(frozen=True)
class Registered:
    module: str  # where its `TARGET` lives
    export_format: str  # what `autocompress export` writes of its studies, the `--format` naming it
    judges_files: bool = False  # `autocompress evaluate` hands its files to its own runtime


TARGETS: dict[str, Registered] = {
    "artifact": Registered("autocompress.targets.artifact", "compressed"),
    "vllm": Registered("autocompress.targets.vllm", "compressed-tensors"),
    "gguf": Registered("autocompress.targets.gguf.target", "gguf", judges_files=True),
}
TARGET_NAMES = tuple(TARGETS)
DEFAULT_TARGET = "artifact"
DENSE_FORMAT = "hf"  # the escape hatch: a plain Hugging Face folder, every weight dense, whatever the target
EXPORT_FORMATS = (*(entry.export_format for entry in TARGETS.values()), DENSE_FORMAT)


def target_named(name: str) -> Target:
    """The target of a `compression.target` name."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose {', '.join(TARGET_NAMES)}")
    return importlib.import_module(TARGETS[name].module).TARGET


def target_writing(format: str) -> Target | None:
    """The target whose export format `format` is; None for the dense escape hatch."""
    if format == DENSE_FORMAT:
        return None
    names = [name for name, entry in TARGETS.items() if entry.export_format == format]
    if not names:
        raise ValueError(f"unknown format {format!r}; choose {', '.join(EXPORT_FORMATS)}")
    return target_named(names[0])


def target_judging(path: Path | str) -> Target | None:
    """The target whose own runtime judges the written file `path`; None: evaluate it as our artifact."""
    for name, entry in TARGETS.items():
        if entry.judges_files and target_named(name).judges(Path(path)):
            return target_named(name)
    return None


def target_of_result(result: dict[str, Any]) -> Target | None:
    """The target whose runtime produced an evaluation `result`; None: transformers (our artifact)."""
    for name, entry in TARGETS.items():
        if entry.judges_files and result.get("runtime") == target_named(name).runtime:
            return target_named(name)
    return None


def size_preset_targets() -> list[Target]:
    """The targets whose runtime's presets a size limit may name (`Target.size_presets`)."""
    return [target for target in map(target_named, TARGETS) if target.size_presets()]


def speed_targets() -> list[str]:
    """The targets whose runtime's speed a study predicts (`Target.predicts_speed`: `search.objectives: [.., speed]`,
    `search.min_speed`)."""
    return [name for name in TARGETS if target_named(name).predicts_speed]


def targets_serving_in_dtype() -> list[str]:
    """The targets that store untouched tensors in `compression.serve_dtype` (`Target.serves_in_dtype`)."""
    return [name for name in TARGETS if target_named(name).serves_in_dtype]
