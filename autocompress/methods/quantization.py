"""Integer weight quantization: per-group scales (and zero-points), round to nearest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autocompress.methods import LayerStatistics, QuantSpec, register_quantizer


def group_count(in_features: int, group_size: int) -> int:
    """Groups per row; the last one may be shorter when group_size does not divide the row."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def grid_parameters(
    weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for each row of `weight`, fitted to its kept values.

    Scales are rounded to float16, the dtype they are stored in, so fake quantization computes exactly
    what an exported artifact will hold. Zero-points are integers on the quantized grid (0 if symmetric).
    """
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = torch.where(kept, weight.abs(), 0).amax(-1, keepdim=True) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**spec.bits - 1
        low = torch.where(kept, weight, math.inf).amin(-1, keepdim=True)
        high = torch.where(kept, weight, -math.inf).amax(-1, keepdim=True)
        empty = torch.isinf(low)
        low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
        scale = (high - low) / qmax
    scale = scale.to(torch.float16).to(weight.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not spec.symmetric:
        zero = torch.clamp(torch.round(-low / scale), 0, qmax)
    return scale, zero


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The nearest value of the grid {(q - zero) · scale : q an integer code of `spec.bits` bits}."""
    if spec.symmetric:
        low, high = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    else:
        low, high = 0, 2**spec.bits - 1
    codes = torch.clamp(torch.round(weight / scale) + zero, low, high)
    return (codes - zero) * scale


def fake_quantize(weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest per group along the input dimension; pruned weights stay zero."""
    out_features, in_features = weight.shape
    size = in_features if spec.group_size == -1 else min(spec.group_size, in_features)
    padding = group_count(in_features, spec.group_size) * size - in_features
    grouped = F.pad(weight, (0, padding)).reshape(out_features, -1, size)
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask
    grouped_mask = F.pad(kept, (0, padding), value=False).reshape(out_features, -1, size)
    scale, zero = grid_parameters(grouped, grouped_mask, spec)
    quantized = round_to_grid(grouped, scale, zero, spec).reshape(out_features, -1)[:, :in_features]
    return quantized if mask is None else quantized * mask


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec, stats: LayerStatistics) -> torch.Tensor:
    """Round-to-nearest with per-group min/max (asymmetric) or absmax (symmetric) scales."""
    return fake_quantize(weight, mask, spec)
