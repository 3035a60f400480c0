"""Pruning: magnitude, Wanda, SparseGPT, and the masks they share (unstructured or N:M)."""

from __future__ import annotations

import torch

from autocompress.methods.hessian import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPING, inverse_cholesky, layer_hessian
from autocompress.methods.registry import LayerStatistics, SparsityPattern, register_pruner


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


@register_pruner("sparsegpt", needs=("hessian",))
@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    sparsity: float,
    pattern: SparsityPattern,
    stats: LayerStatistics,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with error compensation, from H = 2XXᵀ/n.

    Columns are visited left to right in blocks of `block_size`; a pruned weight's error w/[U]_cc is
    spread over the later columns of its row through the upper Cholesky factor U of (H + λI)⁻¹
    (λ = `damping` × mean diagonal), inside the block at once and onto later blocks as one lazy update.

    Mask selection differs from the reference implementation, which prunes each block against one
    threshold shared by all rows (so row counts vary), to keep the size accounting exact: every row
    loses exactly `pruned_per_row` weights.
    - Unstructured: each row prunes, in each block, its share of the row's count proportional to the
      block's width (cumulative rounding, so the shares sum exactly to the row's count), choosing the
      lowest OBS saliencies w²/[U]_cc² among the block's columns as they stand after the updates of the
      earlier blocks (the paper's adaptive mask selection, made per row).
    - N:M: as in the reference, each group of M inputs prunes its M − N lowest saliencies per row when
      the group is reached, which is exact by construction.
    Dead inputs (never active in calibration) have the lowest saliency: within its block (or group) a row
    prunes them first, at no cost, and the weights of dead inputs that its count does not reach are left
    unchanged (no error flows into or out of them). The row counts are exact as long as no kept weight
    lands exactly on 0.0, which float32 updates make practically impossible (an input weight that is
    already 0 is, like for the other pruners, the lowest saliency and pruned first).
    Returns the updated weight (computed in float32) with the pruned positions exactly zero.
    """
    in_features = weight.shape[1]
    count = pruned_per_row(in_features, sparsity, pattern)
    if count == 0:
        return weight.clone()
    hessian, dead = layer_hessian(stats, in_features, weight.device, "sparsegpt")
    upper = inverse_cholesky(hessian, damping)
    work = weight.float().clone()
    structured = not pattern.is_unstructured
    if structured:
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)  # N:M groups never straddle blocks
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end].clone()
        factor = upper[start:end, start:end]
        diagonal = factor.diagonal()
        free = dead[start:end]
        errors = torch.zeros_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        if not structured:
            share = count * end // in_features - count * start // in_features
            if share:
                saliency = (block.square() / diagonal.square()).masked_fill(free, -1.0)
                pruned.scatter_(1, saliency.topk(share, dim=1, largest=False).indices, True)
        for i in range(end - start):
            if structured and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = (block[:, group].square() / diagonal[group].square()).masked_fill(free[group], -1.0)
                lowest = saliency.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                pruned[:, group].scatter_(1, lowest, True)
            column = block[:, i]
            error = torch.where(pruned[:, i], column, 0.0) / diagonal[i]
            block[:, i:].sub_(error.unsqueeze(1) * factor[i, i:].unsqueeze(0))
            errors[:, i] = error
        work[:, start:end] = block.masked_fill(pruned, 0.0)
        work[:, end:].sub_(errors @ upper[start:end, end:])
    return work.to(weight.dtype)
