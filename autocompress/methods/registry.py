"""The registry of compression methods and the types they exchange (statistics, patterns, quantized weights).

The families (`methods.formats`, `methods.pruning`, `methods.quantization`) import this module to register their
functions; `autocompress.methods` imports the families, so importing the package registers every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Statistic = Literal["input_sq_norms", "hessian"]


@dataclass
class LayerStatistics:
    """What calibration measured at the input of one Linear, over `n_tokens` tokens."""

    n_tokens: int = 0
    input_sq_norms: torch.Tensor | None = None  # sum over tokens of x_j², per input channel j
    hessian: torch.Tensor | None = None  # sum over tokens of x xᵀ (in × in)


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured, or N:M (N weights kept in every M consecutive inputs of a row)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_unstructured(self) -> bool:
        return self.m is None


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int  # -1: one group per row
    symmetric: bool


@dataclass
class QuantizedWeight:
    """A quantized weight matrix as it is stored: unsigned integer codes and per-group scales.

    The value of a code is `(level(code) - zero) · scale` of its group, where `level` is the code itself on an
    integer grid, or `levels[code]` for a non-uniform format (a lookup table of 2^bits values).
    Symmetric integer grids store no zero-points: theirs is fixed at 2^(bits-1).

    A named number format (`format`, one of `methods.formats.FORMATS`: FP8, MXFP4, NVFP4, NF4) has zero 0,
    a code-ordered `levels` table, scales held exactly in float32 when their stored type is not float16
    (`scale_format` "e8m0" or "e4m3"; "none": all ones, not stored), and may have one float32 `tensor_scale`
    multiplying the whole tensor; its values are computed in float32, then cast to the dtype asked for.
    """

    codes: torch.Tensor  # [out, in], uint8 (or a wider unsigned type), values in [0, 2^bits)
    scale: torch.Tensor  # [out, groups], float16 as stored
    zero: torch.Tensor  # [out, groups], integer-valued
    bits: int
    group_size: int  # -1: one group per row
    symmetric: bool
    levels: torch.Tensor | None = None
    format: str | None = None  # a named number format (methods.formats); None: an integer grid
    scale_format: str = "float16"  # how `scale` is stored: float16 | e8m0 | e4m3 | none (all ones, not stored)
    tensor_scale: float | None = None  # one float32 scale for the whole tensor (NVFP4, per-tensor FP8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        in_features = self.codes.shape[1]
        size = in_features if self.group_size == -1 else self.group_size
        values = self.codes.long() if self.levels is None else self.levels[self.codes.long()]
        per_column = torch.arange(in_features, device=self.codes.device) // size
        plain = self.scale_format == "float16" and self.tensor_scale is None
        work = dtype if plain else torch.float32  # E8M0 scales may leave the range of a 16-bit dtype
        scale = self.scale.to(work)[:, per_column]
        zero = self.zero.to(work)[:, per_column]
        weight = (values.to(work) - zero) * scale
        if self.tensor_scale is not None:
            weight = weight * torch.tensor(self.tensor_scale, dtype=torch.float32, device=weight.device)
        return weight.to(dtype)


Pruner = Callable[[torch.Tensor, float, SparsityPattern, LayerStatistics], torch.Tensor]
Quantizer = Callable[[torch.Tensor, torch.Tensor | None, QuantSpec, LayerStatistics], QuantizedWeight]


@dataclass(frozen=True)
class Method:
    function: Callable
    needs: frozenset[Statistic]


PRUNERS: dict[str, Method] = {}
QUANTIZERS: dict[str, Method] = {}


def _check_unique(name: str) -> None:
    if name in PRUNERS or name in QUANTIZERS:
        raise ValueError(f"a method named {name!r} is already registered")


def register_pruner(name: str, needs: tuple[Statistic, ...] = ()) -> Callable[[Pruner], Pruner]:
    def register(function: Pruner) -> Pruner:
        _check_unique(name)
        PRUNERS[name] = Method(function, frozenset(needs))
        return function

    return register


def register_quantizer(name: str, needs: tuple[Statistic, ...] = ()) -> Callable[[Quantizer], Quantizer]:
    def register(function: Quantizer) -> Quantizer:
        _check_unique(name)
        QUANTIZERS[name] = Method(function, frozenset(needs))
        return function

    return register
