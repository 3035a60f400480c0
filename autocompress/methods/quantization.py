"""Integer weight quantization: per-group scales (and zero-points), round to nearest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autocompress.methods import LayerStatistics, QuantizedWeight, QuantSpec, register_quantizer


def group_count(in_features: int, group_size: int) -> int:
    """Groups per row; the last one may be shorter when group_size does not divide the row."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def grid_parameters(
    weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for each row of `weight` (last dimension), fitted to its kept values.

    Scales are rounded to float16, the dtype they are stored in, so fake quantization computes exactly
    what an exported artifact holds. Zero-points are integer codes; a symmetric grid's is 2^(bits-1).
    """
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask
    if spec.symmetric:
        scale = torch.where(kept, weight.abs(), 0).amax(-1, keepdim=True) / (2 ** (spec.bits - 1) - 1)
    else:
        low = torch.where(kept, weight, math.inf).amin(-1, keepdim=True)
        high = torch.where(kept, weight, -math.inf).amax(-1, keepdim=True)
        empty = torch.isinf(low)
        low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
        scale = (high - low) / (2**spec.bits - 1)
    scale = scale.to(torch.float16).to(weight.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        zero = torch.clamp(torch.round(-low / scale), 0, 2**spec.bits - 1)
    return scale, zero


def encode(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The nearest code in [0, 2^bits) of each weight on the grid (code - zero) · scale."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest per group along the input dimension, with grids fitted to the kept weights."""
    out_features, in_features = weight.shape
    size = in_features if spec.group_size == -1 else min(spec.group_size, in_features)
    padding = group_count(in_features, spec.group_size) * size - in_features
    grouped = F.pad(weight, (0, padding)).reshape(out_features, -1, size)
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask
    grouped_mask = F.pad(kept, (0, padding), value=False).reshape(out_features, -1, size)
    scale, zero = grid_parameters(grouped, grouped_mask, spec)
    codes = encode(grouped, scale, zero, spec.bits).reshape(out_features, -1)[:, :in_features]
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale.squeeze(-1).to(torch.float16),
        zero=zero.squeeze(-1),
        bits=spec.bits,
        group_size=spec.group_size if spec.group_size == -1 else size,
        symmetric=spec.symmetric,
    )


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec, stats: LayerStatistics) -> QuantizedWeight:
    """Round-to-nearest with per-group min/max (asymmetric) or absmax (symmetric) scales."""
    return quantize_rtn(weight, mask, spec)
