"""The one entry point that applies a CompressionPlan to a model: prune, then quantize, layer by layer."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.errors import UserError
from autocompress.methods import (
    PRUNERS,
    QUANTIZERS,
    LayerStatistics,
    QuantizedWeight,
    QuantSpec,
    SparsityPattern,
    Statistic,
)
from autocompress.methods.formats import FORMATS
from autocompress.models import compressible_linears, unit_names
from autocompress.plan import CompressionPlan, LayerCompression


def sparsity_pattern(plan: CompressionPlan) -> SparsityPattern:
    return SparsityPattern(*plan.nm) if plan.nm else SparsityPattern()


def quantizer_for(setting: LayerCompression, plan: CompressionPlan) -> tuple[str, QuantSpec]:
    """The registered quantizer a quantized setting runs and its spec: a named format's own quantizer and
    scale layout, else the plan's method in the setting's groups (the plan's unless the level names them)."""
    level = setting.level
    if level.is_format:
        group_size = FORMATS[level.method].default_group_size if level.group_size is None else level.group_size
        return level.method, QuantSpec(bits=level.bits, group_size=group_size, symmetric=False)
    group_size = plan.group_size if level.group_size is None else level.group_size
    return plan.quantization, QuantSpec(bits=setting.bits, group_size=group_size, symmetric=plan.symmetric)


def settings_needs(settings: Iterable[LayerCompression], plan: CompressionPlan) -> set[Statistic]:
    """The calibration statistics the methods of `plan` need to compress at each of `settings`."""
    needs: set[Statistic] = set()
    for setting in settings:
        if setting.sparsity > 0:
            needs |= PRUNERS[plan.pruning].needs
        if setting.bits < 16:
            needs |= QUANTIZERS[quantizer_for(setting, plan)[0]].needs
    return needs


def statistics_needed(plan: CompressionPlan) -> set[Statistic]:
    """The calibration statistics the plan's methods need for the levels it uses."""
    return settings_needs([plan.default, *plan.layers.values()], plan)


@dataclass
class CompressedLinear:
    """One Linear as the plan leaves it: the weight it computes with, and what an artifact stores."""

    weight: torch.Tensor  # the dense-shaped weight the compressed model runs with
    mask: torch.Tensor | None  # kept positions, when pruned
    quantized: QuantizedWeight | None  # codes and scales, when quantized


def compress_weight(
    weight: torch.Tensor,
    setting: LayerCompression,
    plan: CompressionPlan,
    stats: LayerStatistics,
    mask: torch.Tensor | None = None,
) -> CompressedLinear:
    """One Linear's weight (out × in) compressed as the plan says, computed in float32.

    A `mask` fixed beforehand (pruned, then fine-tuned with the mask frozen) is kept instead of pruning again.
    """
    compressed = weight.float()
    quantized = None
    if mask is not None:
        compressed = compressed * mask
    elif setting.sparsity > 0:
        compressed = PRUNERS[plan.pruning].function(compressed, setting.sparsity, sparsity_pattern(plan), stats)
        mask = compressed != 0
    if setting.bits < 16:
        method, spec = quantizer_for(setting, plan)
        quantized = QUANTIZERS[method].function(compressed, mask, spec, stats)
        compressed = quantized.dequantize()
        if mask is not None:
            compressed = compressed * mask
    return CompressedLinear(compressed.to(weight.dtype), mask, quantized)


@torch.no_grad()
def apply_plan(
    model: nn.Module,
    plan: CompressionPlan,
    statistics: Mapping[str, LayerStatistics],
    keep: bool = False,
    only: Collection[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, CompressedLinear]:
    """Compress the model in place; it then runs in plain transformers (masked, fake-quantized weights).

    With `keep`, return each compressed Linear's stored form (masks, codes, scales) by name, for export.
    With `only`, compress just the Linears of those names (the others are assumed to hold their plan already).
    `masks` (by Linear name) are kept as they are instead of pruning again (a recovered student).
    A plan with a student compresses the student, not this model: see `autocompress.students.realize_plan`.
    """
    if plan.student is not None:
        raise UserError("plan: a student plan builds a new model; apply it with autocompress.students.realize_plan")
    try:
        plan.check_units(unit_names(model, plan.granularity))
    except ValueError as error:
        raise UserError(f"plan: {error}") from error
    kept: dict[str, CompressedLinear] = {}
    for linear in compressible_linears(model):
        setting = plan.setting(linear.name, linear.block)
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
