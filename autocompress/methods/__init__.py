"""Compression methods, each a small function registered by name.

A pruner takes a weight matrix (out × in), the fraction to prune, the sparsity pattern and the layer's
calibration statistics, and returns the pruned matrix with exactly the requested number of zeros.
A quantizer takes a weight matrix, the mask of kept weights (or None), a `QuantSpec` and the statistics,
and returns a `QuantizedWeight`: the codes and scales an artifact stores, which dequantize to the weights the
compressed model computes with.
Each registration names the calibration statistics its method needs, so they are collected only once
and only when some method asks.
"""

from autocompress.methods import formats, pruning, quantization  # noqa: F401  (importing a family registers it)
from autocompress.methods.registry import (
    PRUNERS,
    QUANTIZERS,
    LayerStatistics,
    Method,
    Pruner,
    QuantizedWeight,
    Quantizer,
    QuantSpec,
    SparsityPattern,
    Statistic,
    register_pruner,
    register_quantizer,
)

__all__ = [
    "PRUNERS",
    "QUANTIZERS",
    "LayerStatistics",
    "Method",
    "Pruner",
    "QuantSpec",
    "QuantizedWeight",
    "Quantizer",
    "SparsityPattern",
    "Statistic",
    "register_pruner",
    "register_quantizer",
]
