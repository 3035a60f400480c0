"""Pruning: magnitude, Wanda, and the masks they share (unstructured or N:M)."""

from __future__ import annotations

import torch

from autocompress.methods import LayerStatistics, SparsityPattern, register_pruner


def pruned_per_row(in_features: int, sparsity: float, pattern: SparsityPattern) -> int:
    """How many weights of each output row are pruned; every pruner removes exactly this many."""
    if sparsity == 0.0:
        return 0
    if pattern.is_unstructured:
        return round(sparsity * in_features)
    if in_features % pattern.m:
        raise ValueError(f"an N:M pattern with M={pattern.m} needs an input size divisible by M, got {in_features}")
    return in_features // pattern.m * (pattern.m - pattern.n)


def prune_lowest(
    weight: torch.Tensor, scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, per_row: bool = True
) -> torch.Tensor:
    """Zero the lowest-scoring weights: per row (or across the layer), or in each group of M inputs."""
    out_features, in_features = weight.shape
    per_row_count = pruned_per_row(in_features, sparsity, pattern)
    if per_row_count == 0:
        return weight.clone()
    keep = torch.ones_like(weight, dtype=torch.bool)
    if not pattern.is_unstructured:
        grouped = scores.reshape(out_features, in_features // pattern.m, pattern.m)
        lowest = grouped.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        keep.view_as(grouped).scatter_(-1, lowest, False)
    elif per_row:
        keep.scatter_(1, scores.topk(per_row_count, dim=1, largest=False).indices, False)
    else:
        lowest = scores.flatten().topk(per_row_count * out_features, largest=False).indices
        keep.view(-1)[lowest] = False
    return weight * keep


@register_pruner("magnitude")
def magnitude(weight: torch.Tensor, sparsity: float, pattern: SparsityPattern, stats: LayerStatistics) -> torch.Tensor:
    """Drop the weights of smallest absolute value, compared across the whole layer."""
    return prune_lowest(weight, weight.abs(), sparsity, pattern, per_row=False)


@register_pruner("wanda", needs=("input_sq_norms",))
def wanda(weight: torch.Tensor, sparsity: float, pattern: SparsityPattern, stats: LayerStatistics) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, compared within each output row."""
    if stats.input_sq_norms is None:
        raise ValueError("wanda needs the calibration activation norms of this layer")
    scores = weight.abs() * stats.input_sq_norms.to(weight).sqrt().unsqueeze(0)
    return prune_lowest(weight, scores, sparsity, pattern)
