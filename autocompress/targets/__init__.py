"""Deployment targets: the runtime a study's models ship to (`compression.target`).

A target decides
- which levels a unit may take: `check_config` refuses, in one line and before any model is loaded, the sparsity
  and levels its runtime cannot run; `check_model` refuses those the model's shapes rule out, from its config alone;
- how its runtime stores the model, so Size is what ships;
- what `autocompress export` writes by default (`export_format`).

`artifact` is our own bit-packed format (`targets.artifact`), whose bytes each level's codec counts
(`codecs.stored_bytes`); it stores every level and any sparsity. `vllm` is compressed-tensors for vLLM
(`targets.vllm.VllmTarget`). Both count bytes per Linear (`LinearTarget`). `gguf` is llama.cpp's file
(`targets.gguf.target.GgufTarget`), whose units include the embedding and the output matrix and whose size is the
file's, header included (`targets.gguf.weights.GgufWeights.size`). A target is looked up by name (`target_named`);
the others are imported only when named, as they import their runtime's libraries.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from autocompress.codecs import resolve, stored_bytes
from autocompress.compress import kept_count
from autocompress.plan import GGUF_METHOD, CompressionPlan, LayerCompression, parse_level

if TYPE_CHECKING:
    from autocompress.config import Config

HALF_BYTES = 2
TARGET_MODULES = {"artifact": "artifact", "vllm": "vllm", "gguf": "gguf.target"}  # under autocompress.targets
TARGET_NAMES = tuple(TARGET_MODULES)


class Target(ABC):
    name: ClassVar[str]
    export_format: ClassVar[str]  # what `autocompress export` writes unless --format says otherwise
    serve_dtype: torch.dtype | None = None  # what the untouched tensors are stored in; None: the target's own rule

    def for_config(self, config: Config) -> Target:
        """This target with the settings `config` gives it (vLLM's serving dtype)."""
        return self

    def check_config(self, config: Config) -> None:
        """Raise ValueError (one line) for sparsity or levels of the config the runtime cannot run."""
        for name in config.search.formats or ():
            if parse_level(name).method == GGUF_METHOD:
                raise ValueError(
                    f"search.formats: {name} is a llama.cpp tensor type, a level of compression.target: gguf only"
                )

    def check_model(self, config: Config) -> None:
        """Raise UserError (one line) for a level the model's Linears cannot take, reading its config only."""
        return None


class LinearTarget(Target):
    """A target that stores each compressible Linear on its own and every other tensor alike."""

    @abstractmethod
    def linear_bytes(
        self,
        setting: LayerCompression,
        plan: CompressionPlan,
        out_features: int,
        in_features: int,
        bias: bool,
        dtype: torch.dtype,
    ) -> int:
        """Bytes one compressible Linear (weight and bias) of a model of `dtype` takes, compressed with `setting`."""

    @abstractmethod
    def tensor_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of an untouched tensor (embeddings, norms, lm_head) of `numel` values of `dtype`."""

    def overhead_bytes(self, model: nn.Module, plan: CompressionPlan) -> int:
        """Bytes the files take beyond their tensors (headers), when the target counts them."""
        return 0


class ArtifactTarget(LinearTarget):
    """Our own artifact: every level, any sparsity, bytes as each level's codec writes them; 16-bit elsewhere."""

    name = "artifact"
    export_format = "compressed"

    def linear_bytes(
        self,
        setting: LayerCompression,
        plan: CompressionPlan,
        out_features: int,
        in_features: int,
        bias: bool,
        dtype: torch.dtype,
    ) -> int:
        kept = kept_count(out_features, in_features, setting, plan)
        size = stored_bytes(resolve(setting, plan), out_features, in_features, kept)
        return size + (out_features * HALF_BYTES if bias else 0)

    def tensor_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * HALF_BYTES


ARTIFACT = ArtifactTarget()


def target_named(name: str) -> Target:
    """The target of a `compression.target` name."""
    if name == ARTIFACT.name:
        return ARTIFACT
    if name not in TARGET_NAMES:
        raise ValueError(f"unknown target {name!r}; choose {', '.join(TARGET_NAMES)}")
    return importlib.import_module(f"autocompress.targets.{TARGET_MODULES[name]}").TARGET
