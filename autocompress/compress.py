"""The one pipeline of stages that compresses: distil → prune → recover → quantize.

`apply_plan` runs the prune and quantize stages on a model's Linears (`prune_weight`, then `quantize_weight`
through the unit's codec); the layer-variant database runs the same two functions, pruning once per sparsity level
and quantizing that at each precision level; a plan that trains (`students.StudentTrainer.realize`) distils a
student before them and recovers by KD between them (`apply_plan(..., stages=("prune",))`, then the quantize
stage with the masks kept).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from autocompress.codecs import Codec, CompressedLinear, resolve
from autocompress.errors import UserError
from autocompress.methods import PRUNERS, LayerStatistics, SparsityPattern, Statistic
from autocompress.methods.pruning import pruned_per_row
from autocompress.models import compressible_linears, unit_names
from autocompress.plan import CompressionPlan, LayerCompression

STAGES = ("distil", "prune", "recover", "quantize")
COMPRESSION_STAGES = ("prune", "quantize")  # the stages `apply_plan` runs; the others train (`students`)

__all__ = ["STAGES", "CompressedLinear", "apply_plan", "compress_weight", "prune_weight", "quantize_weight"]


def sparsity_pattern(plan: CompressionPlan) -> SparsityPattern:
    return SparsityPattern(*plan.nm) if plan.nm else SparsityPattern()


def settings_needs(
    settings: Iterable[LayerCompression], plan: CompressionPlan, stages: Collection[str] = COMPRESSION_STAGES
) -> set[Statistic]:
    """The calibration statistics the methods of `plan` need to compress at each of `settings` (in `stages`)."""
    needs: set[Statistic] = set()
    for setting in settings:
        if setting.sparsity > 0 and "prune" in stages:
            needs |= PRUNERS[plan.pruning].needs
        if setting.bits < 16 and "quantize" in stages:
            needs |= resolve(setting, plan).needs
    return needs


def kept_count(out_features: int, in_features: int, setting: LayerCompression, plan: CompressionPlan) -> int | None:
    """Weights a pruned Linear keeps (every pruner leaves exactly this many per row); None when it is not pruned."""
    if setting.sparsity == 0:
        return None
    return out_features * (in_features - pruned_per_row(in_features, setting.sparsity, sparsity_pattern(plan)))


def statistics_needed(plan: CompressionPlan) -> set[Statistic]:
    """The calibration statistics the plan's methods need for the levels it uses."""
    return settings_needs([plan.default, *plan.layers.values()], plan)


def prune_weight(
    weight: torch.Tensor,
    setting: LayerCompression,
    plan: CompressionPlan,
    stats: LayerStatistics,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prune stage: the weight in float32 with the setting's sparsity (or a `mask` fixed beforehand, as after
    a recovery) applied, and its mask of kept positions (None when nothing is pruned)."""
    pruned = weight.float()
    if mask is not None:
        return pruned * mask, mask
    if setting.sparsity > 0:
        pruned = PRUNERS[plan.pruning].function(pruned, setting.sparsity, sparsity_pattern(plan), stats)
        return pruned, pruned != 0
    return pruned, None


def quantize_weight(
    pruned: torch.Tensor, mask: torch.Tensor | None, codec: Codec, stats: LayerStatistics, dtype: torch.dtype
) -> CompressedLinear:
    """The quantize stage: what the codec stores of a pruned float32 weight, and the weight (in `dtype`) that the
    compressed model computes with, which is exactly what those codes and scales decode to."""
    quantized = codec.quantize(pruned, mask, stats)
    if quantized is None:
        return CompressedLinear(pruned.to(dtype), mask, None)
    weight = quantized.dequantize()
    if mask is not None:
        weight = weight * mask
    return CompressedLinear(weight.to(dtype), mask, quantized)


def compress_weight(
    weight: torch.Tensor,
    setting: LayerCompression,
    plan: CompressionPlan,
    stats: LayerStatistics,
    mask: torch.Tensor | None = None,
) -> CompressedLinear:
    """One Linear's weight (out × in) through the prune and quantize stages as the plan says, in float32.

    A `mask` fixed beforehand (pruned, then fine-tuned with the mask frozen) is kept instead of pruning again.
    """
    pruned, mask = prune_weight(weight, setting, plan, stats, mask)
    return quantize_weight(pruned, mask, resolve(setting, plan), stats, weight.dtype)


@torch.no_grad()
def apply_plan(
    model: nn.Module,
    plan: CompressionPlan,
    statistics: Mapping[str, LayerStatistics],
    keep: bool = False,
    only: Collection[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    stages: Collection[str] = COMPRESSION_STAGES,
) -> dict[str, CompressedLinear]:
    """Compress the model in place; it then runs in plain transformers (masked, fake-quantized weights).

    With `keep`, return each compressed Linear's stored form (masks, codes, scales) by name, for export.
    With `only`, compress just the Linears of those names (the others are assumed to hold their plan already).
    `masks` (by Linear name) are kept as they are instead of pruning again (a recovered student).
    `stages` ("prune" alone: the stage before a recovery) leaves out the quantize stage.
    A plan with a student compresses the student, not this model: see `StudentTrainer.realize`.
    """
    if plan.student is not None:
        raise UserError("plan: a student plan builds a new model; apply it with CompressionSession.realize")
    try:
        plan.check_units(unit_names(model, plan.granularity))
    except ValueError as error:
        raise UserError(f"plan: {error}") from error
    kept: dict[str, CompressedLinear] = {}
    for linear in compressible_linears(model):
        setting = plan.setting(linear.name, linear.block)
        if "quantize" not in stages:
            setting = LayerCompression(sparsity=setting.sparsity)
        if setting.is_identity or (only is not None and linear.name not in only):
            continue
        stats = statistics.get(linear.name, LayerStatistics())
        try:
            mask = None if masks is None else masks.get(linear.name)
            compressed = compress_weight(linear.module.weight.data, setting, plan, stats, mask)
        except ValueError as error:
            raise UserError(f"plan: cannot compress {linear.name}: {error}") from error
        linear.module.weight.data.copy_(compressed.weight)
        if keep:
            kept[linear.name] = compressed
    return kept
