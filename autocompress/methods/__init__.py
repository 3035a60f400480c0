"""Compression methods, each a small function registered by name.

A pruner takes a weight matrix (out × in), the fraction to prune, the sparsity pattern and the layer's
calibration statistics, and returns the pruned matrix with exactly the requested number of zeros.
A quantizer takes a weight matrix, the mask of kept weights (or None), a `QuantSpec` and the statistics,
and returns the weights rounded to the values its format can store (fake quantization).
Each registration names the calibration statistics its method needs, so they are collected only once
and only when some method asks.
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


Pruner = Callable[[torch.Tensor, float, SparsityPattern, LayerStatistics], torch.Tensor]
Quantizer = Callable[[torch.Tensor, torch.Tensor | None, QuantSpec, LayerStatistics], torch.Tensor]


@dataclass(frozen=True)
class Method:
    function: Callable
    needs: frozenset[Statistic]


PRUNERS: dict[str, Method] = {}
QUANTIZERS: dict[str, Method] = {}


def register_pruner(name: str, needs: tuple[Statistic, ...] = ()) -> Callable[[Pruner], Pruner]:
    def register(function: Pruner) -> Pruner:
        PRUNERS[name] = Method(function, frozenset(needs))
        return function

    return register


def register_quantizer(name: str, needs: tuple[Statistic, ...] = ()) -> Callable[[Quantizer], Quantizer]:
    def register(function: Quantizer) -> Quantizer:
        QUANTIZERS[name] = Method(function, frozenset(needs))
        return function

    return register


# Importing the families registers their methods.
from autocompress.methods import pruning, quantization  # noqa: E402, F401
